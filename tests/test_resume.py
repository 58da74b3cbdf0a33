"""Exact resume through scripts/train.py on the tiny model: kill -9 after a checkpoint, resume, same losses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from convert.flux_transformer import main as convert_main
from convert.lora_to_diffusers import main as export_main
from dreamomni2_jax import checkpoint as C
from dreamomni2_jax.lora_io import load_lora_file

REPO = Path(__file__).resolve().parents[1]
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
    from jax.experimental.compilation_cache import compilation_cache

    path = tmp_path_factory.mktemp("xla_cache")
    compilation_cache.reset_cache()  # (re)initialised lazily from the config below
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(path), 0.0, 0)):
        jax.config.update(n, v)
    yield path
    for n, v in old.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


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
    env = {**os.environ, C.KILL_ENV: "3", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *_argv(config_file, run)],
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
