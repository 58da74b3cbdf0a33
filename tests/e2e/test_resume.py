"""Exact resume through scripts/train.py on the tiny model: kill -9 after a checkpoint, resume, same losses."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from support.compile_cache import persistent_compile_cache

from dreamomni2_jax.convert.flux_transformer import main as convert_main
from dreamomni2_jax.tools.export_lora import main as export_main
from dreamomni2_jax.checkpoint import store as C
from dreamomni2_jax.lora.files import load_lora_file

REPO = Path(__file__).resolve().parents[2]
KILL_AFTER_SAVE = REPO / "tests" / "support" / "kill_after_save.py"  # run as a script: SIGKILL after step N's save
CONFIG = """
from dreamomni2_jax.config import *


def get_config():
    return Config(
        model=ModelConfig(path={model!r}, param_dtype="float32", compute_dtype="float32", attention="xla",
                          remat="none"),
        lora=LoraConfig(rank=2, alpha=4.0, preset="attention"),
        data=DataConfig(batch_size=1, max_sequence_length=8, synthetic_resolution=(32, 48),
                        synthetic_refs=((32, 32),)),
        optim=OptimConfig(lr=1e-2, warmup_steps=0),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1, distributed="off"),
        checkpoint=CheckpointConfig(every_steps=3, max_to_keep=3, async_save=True),
        train=TrainConfig(run_dir="unused", steps=6, seed=0, log_every=1),
    )
"""


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Persistent XLA cache shared by this module's runs (and its subprocess): every run compiles the same step."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")) as path:
        yield path


@pytest.fixture(scope="module")
def config_file(tiny_pipeline_dir, tmp_path_factory, compile_cache):
    root = tmp_path_factory.mktemp("resume")
    model = root / "flux32"
    assert convert_main(["--src", str(tiny_pipeline_dir / "transformer"), "--out", str(model), "--dtype", "fp32",
                         "--no-progress"]) == 0
    path = root / "tiny_train.py"
    path.write_text(CONFIG.format(model=str(model)))
    return path


def _argv(config_file, run_dir, *extra):
    return ["--config", str(config_file), "--set", f"train.run_dir={run_dir}", "--no-progress", *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss (a step logged twice, e.g. before a kill and after the resume, keeps its last record)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _train_in_process(argv, callbacks=()):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv, callbacks=callbacks)


@pytest.fixture(scope="module")
def straight_run(config_file, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The reference: 6 steps in one go (checkpoints at 3 and 6) -> (run dir, losses)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert _train_in_process(_argv(config_file, run)) == 0
    return run, _losses(run)


@pytest.fixture(scope="module")
def straight(straight_run) -> dict[int, float]:
    return straight_run[1]


def test_kill9_after_checkpoint_then_resume_is_exact(config_file, straight, tmp_path, compile_cache):
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    run = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run([sys.executable, str(KILL_AFTER_SAVE), "3", *_argv(config_file, run)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert C.complete_steps(run / "checkpoints") == [3]
    # died right after the step-3 checkpoint; the loop logs step n after dispatching n + 1, so 3 is not logged
    assert sorted(_losses(run)) == [1, 2]
    assert _train_in_process(_argv(config_file, run)) == 0  # resumes from run_dir/checkpoints/3 by itself
    resumed = _losses(run)
    assert sorted(resumed) == [1, 2, 4, 5, 6]
    assert resumed == {k: straight[k] for k in resumed}  # bitwise: same floats, not just close
    assert C.complete_steps(run / "checkpoints") == [3, 6]
    state, step, _ = C.load_state(run)
    assert step == 6 and int(state["step"]) == 6


class _SigtermAt:
    """Test callback: delivers SIGTERM to this process after step ``n`` (as a preemption notice would)."""

    def __init__(self, n: int):
        self.n = n

    def on_start(self, ctx):
        pass

    def on_step_end(self, ctx, metrics):
        if ctx.step == self.n:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_end(self, ctx):
        pass


def test_sigterm_finishes_step_saves_and_exits_zero(config_file, straight, tmp_path):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    assert _train_in_process(_argv(config_file, run), callbacks=[_SigtermAt(2)]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    # the flag is seen after step 3 (the checkpoint callback runs first): step 3 saved, training stopped there
    assert C.complete_steps(run / "checkpoints") == [3]
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3] and losses == {k: straight[k] for k in (1, 2, 3)}
    # explicit --resume from that step folder into a fresh run dir continues exactly
    other = tmp_path / "other"
    assert _train_in_process(_argv(config_file, other, "--resume", str(run / "checkpoints" / "3"))) == 0
    assert _losses(other) == {k: straight[k] for k in (4, 5, 6)}


def test_checkpoint_holds_adapters_only_and_init_from_continues_a_lora(config_file, straight_run, tmp_path):
    """Checkpoints never contain base weights; ``lora.init_from`` starts training from an exported file."""
    run = straight_run[0]
    state, step, _ = C.load_state(run)
    assert step == 6 and sorted(state) == ["lora", "nonfinite", "opt_state", "skipped", "step"]
    leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert not [p for p in leaves if "kernel" in p or "bias" in p or "scale" in p]
    lora_file = tmp_path / "src.safetensors"
    assert export_main(["--ckpt", str(run), "--out", str(lora_file), "--dtype", "fp32", "--format", "kohya"]) == 0
    # continue from the file with a vanishing learning rate: the saved adapters are the file's
    run2 = tmp_path / "from_file"
    assert _train_in_process(_argv(config_file, run2, "--set", "train.steps=1", "--set", "optim.lr=1e-30",
                                   "--set", "lora.rank=8", "--set", f"lora.init_from={lora_file}")) == 0
    flat, meta = C.load_lora(run2)
    want, file_meta = load_lora_file(lora_file)
    assert (meta["rank"], meta["alpha"]) == (file_meta["rank"], file_meta["alpha"]) == (2, 4.0)  # the file's
    assert flat.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(flat[k], want[k], rtol=0, atol=1e-20, err_msg=k)


def _records(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_to_an_earlier_step_is_refused_then_branches(config_file, straight_run, tmp_path, capsys):
    """--resume to an earlier step of the same run: refused (nothing touched) unless --branch, which moves the
    later steps and their metrics aside, and then continues exactly; metrics stay one record per step."""
    run = tmp_path / "run"
    shutil.copytree(straight_run[0], run)
    straight = straight_run[1]
    config_before = (run / "config.json").read_text()
    step3 = run / "checkpoints" / "3"
    assert _train_in_process(_argv(config_file, run, "--resume", str(step3))) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints'} has checkpoints after step 3 ([6])" in err and "--branch" in err, err
    assert "Traceback" not in err
    assert C.complete_steps(run / "checkpoints") == [3, 6] and _records(run) == [1, 2, 3, 4, 5, 6]
    # a refused resume (changed LoRA rank) leaves config.json as it was
    assert _train_in_process(_argv(config_file, run, "--set", "lora.rank=3", "--set", "train.steps=9")) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / '6' / 'state'} does not match" in err and "Traceback" not in err, err
    assert (run / "config.json").read_text() == config_before
    # so does a changed batch size (the data position would not mean the same batches)
    assert _train_in_process(_argv(config_file, run, "--set", "data.batch_size=2", "--set", "train.steps=9")) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / '6' / 'data'}: data iterator state is for another stream" in err, err
    assert "data.batch_size" in err and (run / "config.json").read_text() == config_before
    # --branch: steps 4..6 are redone from step 3 and give the same losses; the old ones are kept aside
    assert _train_in_process(_argv(config_file, run, "--resume", str(step3), "--branch")) == 0
    (branch,) = (run / "branches").iterdir()
    assert C.complete_steps(branch / "checkpoints") == [6]
    assert [json.loads(x)["step"] for x in (branch / "metrics.jsonl").read_text().splitlines()] == [4, 5, 6]
    assert C.complete_steps(run / "checkpoints") == [3, 6]
    assert _records(run) == [1, 2, 3, 4, 5, 6] and _losses(run) == straight
    state, step, _ = C.load_state(run)
    assert step == 6 and int(state["step"]) == 6


def test_second_run_on_a_locked_run_dir_is_refused(config_file, tmp_path, capsys):
    from dreamomni2_jax.checkpoint.run_dir import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        assert _train_in_process(_argv(config_file, run)) == 2
    err = capsys.readouterr().err
    assert f"{run}: run dir is in use by another training process (pid {os.getpid()}" in err, err
    assert not (run / "checkpoints").exists() and not (run / "config.json").exists()


def test_flipped_bit_in_a_checkpoint_is_detected(config_file, straight_run, tmp_path, capsys):
    """Every saved array has a digest; a damaged step is named, with the newest intact step to resume from."""
    run = tmp_path / "run"
    shutil.copytree(straight_run[0], run)
    meta_file = run / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["digest"]["algorithm"] == "wsum32-v1" and len(meta["digest"]["leaves"]) > 4
    key = next(k for k in meta["digest"]["leaves"] if k.endswith("lora_B"))
    meta["digest"]["leaves"][key] ^= 1 << 7  # as if one bit of that array had flipped on disk
    meta_file.write_text(json.dumps(meta))
    assert _train_in_process(_argv(config_file, run, "--set", "train.steps=9")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / '6'} is corrupt or incomplete" in err and key in err, err
    assert "the last intact checkpoint is step 3" in err and "--branch" in err and "Traceback" not in err
    with pytest.raises(C.CheckpointError, match="do not match their digest"):
        C.load_lora(run)
    assert export_main(["--ckpt", str(run), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    flat, meta3 = C.load_lora(run, step=3)  # the intact step still exports
    assert meta3["step"] == 3 and flat


def test_resume_to_a_missing_path_and_garbage_metadata(config_file, straight_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train_in_process(_argv(config_file, run, "--resume", str(tmp_path / "nope"))) == 2
    err = capsys.readouterr().err
    assert f"checkpoint path {tmp_path / 'nope'} does not exist" in err and "Traceback" not in err, err
    assert "Event loop" not in err and not (run / "config.json").exists()
    run = tmp_path / "copy"
    shutil.copytree(straight_run[0], run)
    (run / "checkpoints" / "6" / "meta" / "metadata").write_text("{garbage")
    assert export_main(["--ckpt", str(run), "--out", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / '6' / 'meta' / 'metadata'}" in err and "Traceback" not in err, err
