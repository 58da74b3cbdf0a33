"""Training as several processes joined by JAX's distributed runtime (loopback, gloo CPU collectives), against one
process over the same number of devices: ``scripts/train.py`` started by the shared launcher
(:mod:`support.multiprocess`) exactly as ``mpirun -np N`` would start it on N hosts.

The global batch plan, the noise / σ / dropout draws and the sharded step do not depend on how the devices are split
into processes, but the reductions do not run in the same order: a cross-process all-reduce goes through gloo, one
process's through XLA's in-process collectives, so losses differ in the last float32 bit (measured: ~1e-7 relative,
from step 1, BENCHMARKS.md). Runs of different process counts are compared at ``RTOL``, runs of the same process count
bitwise (a kill -9 of every process after a checkpoint, then the same command again).

Covered: 2 processes x 4 devices and 4 x 2 against 1 x 8; kill -9; SIGTERM to every process (the same step saved by
both, exit 0); a resume by 1 process of what 2 processes wrote (the data position re-split); the validation grid
written once (by process 0); the exported LoRA and a one-process ``scripts/sample.py --lora RUN`` of a 2-process run;
EMA, DoRA, masks, reference dropout, held-out loss and every optimizer; FLUX.2 [klein].
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from support import multiprocess as mp

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(REPO / "scripts" / "train.py")]
RTOL = 2e-6  # another process count: float32 rounding of differently ordered reductions (module docstring)
TIMEOUT_S = int(os.environ.get("DREAMOMNI2_MP_TIMEOUT_S", "480"))  # per launch: a hang fails the test, not CI
CONFIG = """
from dreamomni2_jax.config import *


def get_config():
    return Config(
        model=ModelConfig(path={model!r}, param_dtype="float32", compute_dtype="float32", attention="xla",
                          remat="none"),
        lora=LoraConfig(rank=4, alpha=4.0, preset="attention"),
        data=DataConfig(cache_dir={cache!r}, batch_size=8, max_refs=3, target_max_area=96 * 96,
                        reference_max_area=96 * 96, min_image_size=32, batching="pad", num_workers=0,
                        max_sequence_length=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="auto"),
        checkpoint=CheckpointConfig(every_steps=2, max_to_keep=10, async_save=True),
        sample=SampleConfig(steps=2, guidance=3.5, every_steps=0, validation=(
            ValidationSample(prompt="put the hat from image 2 on the person in image 1",
                             references=({ref0!r}, {ref1!r}), seed=0, height=64, width=64),)),
        train=TrainConfig(run_dir="unused", steps=8, seed=0, timestep_sampling="uniform", log_every=1),
    )
"""


class Setup(NamedTuple):
    config: Path
    env: dict  # with a persistent compile cache shared by every process of this module
    model: str = ""
    refs: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def setup(tiny_cache, tmp_path_factory) -> Setup:
    cfg, manifest, cache = tiny_cache
    root = tmp_path_factory.mktemp("multiprocess")
    img = manifest.parent / "img"
    config = root / "mp_train.py"
    config.write_text(CONFIG.format(model=cfg.model.path, cache=str(cache), ref0=str(img / "s1_ref0.png"),
                                    ref1=str(img / "s1_ref1.png")))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return Setup(config, env, cfg.model.path, (str(img / "s1_ref0.png"), str(img / "s1_ref1.png")))


def _args(config: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--set", f"train.run_dir={run}", "--no-progress", *extra]


def _one_process(setup: Setup, run: Path, *extra: str, devices: int = 8) -> subprocess.CompletedProcess:
    config, env = setup.config, setup.env
    env = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([*TRAIN, *_args(config, run, *extra)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _start(setup: Setup, run: Path, nproc: int, devices: int, *extra: str) -> list[mp.Proc]:
    config, env = setup.config, setup.env
    return mp.start([*TRAIN, *_args(config, run, *extra)], nproc, devices, cwd=REPO,
                    logs=run.parent / f"{run.name}-logs", env=env)


def _launch(setup, run: Path, nproc: int, devices: int, *extra: str) -> list[mp.Proc]:
    procs = mp.wait(_start(setup, run, nproc, devices, *extra), TIMEOUT_S)
    assert all(p.returncode == 0 for p in procs), mp.report(procs)
    return procs


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_close(got: dict[int, float], want: dict[int, float], rtol: float = RTOL) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=rtol)


def _done(run: Path, step: int) -> bool:
    return (run / "checkpoints" / str(step) / "commit_success.txt").is_file()


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """1 process x 8 devices, 6 steps, a validation grid at the last step (a grid sampled mid-run changes the steps
    after it, by a different amount per process split: BENCHMARKS.md "Several processes"; so it comes last here)."""
    run = tmp_path_factory.mktemp("one") / "run"
    _one_process(setup, run, "--set", "sample.every_steps=6", "--set", "train.steps=6")
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7)) and len(set(losses.values())) == 6
    return run, losses


@pytest.fixture(scope="module")
def two(setup, tmp_path_factory):
    """The same as 2 processes x 4 devices."""
    run = tmp_path_factory.mktemp("two") / "run"
    procs = _launch(setup, run, 2, 4, "--set", "sample.every_steps=6", "--set", "train.steps=6")
    return run, procs


def test_two_processes_train_the_one_process_losses(straight, two):
    (_, want), (run, procs) = straight, two
    assert "2 process(es), 8 devices" in procs[0].output and "global batch 8 (4 per process)" in procs[0].output
    assert "step 1 loss" not in procs[1].output  # logs and metrics: process 0 only
    _assert_close(_losses(run), want)
    step_dir = run / "checkpoints" / "6" / "data"
    assert sorted(p.name for p in step_dir.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_validation_grid_is_written_once_and_matches_one_process(straight, two):
    (one, _), (run, _) = straight, two
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000006.png"]
    got = np.asarray(Image.open(run / "samples" / "step_000006.png"), np.int16)
    want = np.asarray(Image.open(one / "samples" / "step_000006.png"), np.int16)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_exported_lora_equals_the_one_process_runs(setup, straight, two, tmp_path):
    (one, _), (run, _) = straight, two
    files = {}
    for name, src in (("one", one / "checkpoints" / "6"), ("two", run)):
        files[name] = tmp_path / f"{name}.safetensors"
        proc = subprocess.run([sys.executable, str(REPO / "convert" / "export_lora.py"), "--ckpt", str(src), "--out",
                               str(files[name]), "--dtype", "fp32"], env=setup.env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(files["one"]), load_file(files["two"])
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_one_process_samples_with_a_two_process_run(setup, straight, two, tmp_path):
    """scripts/sample.py --lora RUN (one process) reads what 2 processes wrote: the image of the 1-process run."""
    (one, _), (run, _) = straight, two
    model, refs = setup.model, setup.refs
    pngs = {}
    for name, lora in (("one", one / "checkpoints" / "6"), ("two", run)):
        pngs[name] = tmp_path / f"{name}.png"
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--model", model, "--prompt",
                               "put the hat from image 2 on the person in image 1", *[a for r in refs for a in
                                                                                     ("--ref", r)],
                               "--lora", str(lora), "--steps", "2", "--height", "64", "--width", "64", "--max-area",
                               str(64 * 64), "--ref-area", str(64 * 64), "--dtype", "fp32", "--out", str(pngs[name]),
                               "--no-progress"], env=setup.env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (np.asarray(Image.open(pngs[n]), np.int16) for n in ("one", "two"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_kill9_of_every_process_after_a_checkpoint_then_the_same_command_continues_exactly(setup, two, tmp_path):
    want = _losses(two[0])
    run = tmp_path / "run"
    procs = _start(setup, run, 2, 4, "--set", "train.steps=6")
    mp.wait(procs, TIMEOUT_S, until=lambda: _done(run, 2))
    mp.kill(procs)  # SIGKILL to every process (no clean-up runs)
    procs = mp.wait(procs, 60)
    assert _done(run, 2) and not _done(run, 6), mp.report(procs)
    _launch(setup, run, 2, 4, "--set", "train.steps=6")
    assert _losses(run) == want  # the same process count: bitwise


def test_sigterm_to_every_process_saves_the_same_step_and_exits_zero(setup, tmp_path):
    run = tmp_path / "run"
    procs = _start(setup, run, 2, 4, "--set", "train.steps=1000", "--set", "checkpoint.every_steps=1000")
    mp.wait(procs, TIMEOUT_S, until=lambda: (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 2)
    mp.kill(procs, signal.SIGTERM)
    procs = mp.wait(procs, 120)
    assert [p.returncode for p in procs] == [0, 0], mp.report(procs)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    last = max(_losses(run))
    assert steps == [last] and _done(run, last), (steps, last)
    data = run / "checkpoints" / str(last) / "data"
    assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert "preempted: checkpoint of step" in procs[0].output


def test_one_process_resumes_what_two_wrote_exactly(setup, straight, two, tmp_path):
    """The data position is global: a checkpoint of 2 processes continues on 1 (re-split) as the 1-process run's
    own checkpoint does."""
    (one, _), (run, _) = straight, two
    got = {}
    for name, src in (("two", run), ("one", one)):
        copy = tmp_path / name
        subprocess.run(["cp", "-r", str(src), str(copy)], check=True)
        proc = _one_process(setup, copy, "--set", "train.steps=8")
        assert ("re-split over 1" in proc.stderr) == (name == "two")
        got[name] = _losses(copy)
    assert {s: got["two"][s] for s in range(1, 7)} == _losses(run)  # steps 1-6: the 2-process run's records
    _assert_close(got["two"], got["one"])


def test_four_processes_of_two_devices(setup, straight, tmp_path):
    _, want = straight
    run = tmp_path / "run"
    t0 = time.monotonic()
    _launch(setup, run, 4, 2, "--set", "train.steps=3", "--set", "checkpoint.every_steps=1000")
    _assert_close(_losses(run), {s: want[s] for s in range(1, 4)})
    assert time.monotonic() - t0 < TIMEOUT_S


# every training feature, each optimizer, and FLUX.2 [klein]: 2 processes x 4 devices == 1 process x 8, bitwise
FEATURES = {
    "ema-dora-masks-refdrop-heldout-schedulefree": (
        "train.ema_decay=0.9", "train.ema_warmup=true", "lora.variant=dora", "train.loss_mask=difference",
        "train.mask_floor=0.2", "data.reference_dropout=0.5", "train.eval_every=2", "train.eval_sigmas=2",
        "optim.name=schedule_free_adamw", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.schedule_free_warmup=2"),
    "prodigy": ("optim.name=prodigy", "optim.lr=1.0"),
    "muon": ("optim.name=muon",),
    "adafactor": ("optim.name=adafactor",),
}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FEATURES))
def test_features_and_optimizers_on_two_processes_equal_one(setup, tiny_cache, name, tmp_path):
    extra = [a for kv in FEATURES[name] for a in ("--set", kv)]
    extra += ["--set", "train.steps=3", "--set", "checkpoint.every_steps=1000"]
    if "train.eval_every=2" in FEATURES[name]:
        extra += ["--set", f"data.eval_cache_dir={tiny_cache[2]}"]
    _one_process(setup, tmp_path / "one", *extra)
    _launch(setup, tmp_path / "two", 2, 4, *extra)
    want, got = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in got] == [r["step"] for r in want] and len(want) >= 3
    for key in ("loss", "grad_norm", "eval_loss"):
        steps = [r["step"] for r in want if key in r]
        assert steps == [r["step"] for r in got if key in r], key
        np.testing.assert_allclose([r[key] for r in got if key in r], [r[key] for r in want if key in r],
                                   rtol=1e-5, err_msg=key)
    if "train.eval_every=2" in FEATURES[name]:
        assert any("eval_loss" in r for r in want)


@pytest.mark.slow
def test_klein_on_two_processes_equals_one(chain, tmp_path):  # noqa: F811 - chain: test_klein_e2e's tiny klein chain
    setup = Setup(REPO / "configs" / "klein_demo.py", {**os.environ, "JAX_PLATFORMS": "cpu",
                                                        "DREAMOMNI2_DEMO_OUT": str(chain)})
    extra = ["--set", "mesh.distributed=auto", "--set", "data.batch_size=8", "--set", "train.steps=3",
             "--set", "sample.every_steps=0", "--set", "checkpoint.every_steps=1000"]
    _one_process(setup, tmp_path / "one", *extra)
    _launch(setup, tmp_path / "two", 2, 4, *extra)
    want = _losses(tmp_path / "one")
    assert len(want) == 3
    _assert_close(_losses(tmp_path / "two"), want, rtol=1e-5)


from test_klein_e2e import chain, compile_cache  # noqa: E402,F401 - the tiny klein chain fixture
