"""Bad input across hosts, with the shared launcher (tests/support/multiprocess.py): 2 processes on loopback.

Each case must end every process with ONE line (``error: ...``), exit code 2, no traceback, within a tight
timeout: a coordinator that never comes up, a run directory the hosts do not share, a different ``--set`` on one
process, a run dir locked by another run, and one process killed (-9) after a checkpoint (the survivor stops and
names it; the checkpoint resumes).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.multiprocess import kill, launch, report, start, wait

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mp_inputs(tiny_converted_dir, tmp_path_factory):
    """(model dir, cache dir, environment) for ``scripts/train.py --config configs/demo.py`` (its validation
    images live under ``$DREAMOMNI2_DEMO_OUT/data``)."""
    from dreamomni2_jax.testing.tiny_flux1 import write_jsonl

    out = tmp_path_factory.mktemp("mp")
    manifest = write_jsonl(out / "data")
    env = {**os.environ, "DREAMOMNI2_DEMO_OUT": str(out), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "scripts/cache.py", "--config", "configs/demo.py", "--set",
                    f"model.path={tiny_converted_dir}", "--data", str(manifest), "--out", str(out / "cache")],
                   cwd=ROOT, env=env, check=True, timeout=600, capture_output=True)
    return tiny_converted_dir, out / "cache", env


def train_cmd(model, cache, run_dir, *sets):
    return [sys.executable, "scripts/train.py", "--config", "configs/demo.py", "--set", f"model.path={model}",
            "--set", f"data.cache_dir={cache}", "--set", f"train.run_dir={run_dir}", "--set", "mesh.distributed=auto",
            "--set", "data.batch_size=8", "--no-progress", *[a for s in sets for a in ("--set", s)]]


def error_lines(p) -> list[str]:
    return [line for line in p.output.splitlines() if line.startswith("error: ")]


def assert_one_clear_line(procs, *needles):
    for p in procs:
        assert p.returncode == 2 and not p.killed, report(procs)
        assert "Traceback" not in p.output and "Check failure" not in p.output, report(procs)
        lines = error_lines(p)
        assert len(lines) == 1, report(procs)
        for needle in needles:
            assert needle in lines[0], (needle, report(procs))
    return [error_lines(p)[0] for p in procs]


def test_unreachable_coordinator(mp_inputs, tmp_path):
    """Only process 1 of 2 is started: its coordinator never comes up; it stops after mesh.init_timeout_s."""
    model, cache, env = mp_inputs
    t0 = time.monotonic()
    procs = wait(start(train_cmd(model, cache, tmp_path / "run", "mesh.init_timeout_s=5"), 2, 2, cwd=ROOT,
                       logs=tmp_path / "logs", env=env, ranks=[1]), timeout_s=90)
    took = time.monotonic() - t0
    [line] = assert_one_clear_line(procs, "mesh.init_timeout_s=5 s", "127.0.0.1:", "coordinator")
    assert took < 60, (took, line)


def test_run_dir_not_shared(mp_inputs, tmp_path):
    model, cache, env = mp_inputs
    procs = launch(train_cmd(model, cache, tmp_path / "run{rank}", "train.steps=2", "mesh.init_timeout_s=60"), 2, 2,
                   cwd=ROOT, logs=tmp_path / "logs", env=env, timeout_s=240, grace_s=60)
    lines = assert_one_clear_line(procs, "is not shared between hosts", "visible to every host")
    assert str(tmp_path / "run0") in lines[0] and str(tmp_path / "run1") in lines[1], lines
    assert not (tmp_path / "run0" / "checkpoints").exists()


def test_different_set_on_one_process(mp_inputs, tmp_path):
    model, cache, env = mp_inputs
    procs = launch(train_cmd(model, cache, tmp_path / "run", "train.steps=2", "optim.lr=1e-{rank}"), 2, 2, cwd=ROOT,
                   logs=tmp_path / "logs", env=env, timeout_s=240, grace_s=60)
    lines = assert_one_clear_line(procs, "different configs", "optim.lr differs on process(es) 1")
    assert "1.0" in lines[0] and "0.1" in lines[1], lines


def test_busy_run_dir_stops_every_process(mp_inputs, tmp_path):
    """Process 0 cannot take the run dir's lock: process 1 must not wait for it in a collective."""
    from dreamomni2_jax.checkpoint.run_dir import RunLock

    model, cache, env = mp_inputs
    with RunLock(tmp_path / "run"):
        procs = launch(train_cmd(model, cache, tmp_path / "run", "train.steps=2"), 2, 2, cwd=ROOT,
                       logs=tmp_path / "logs", env=env, timeout_s=240, grace_s=60)
    lines = assert_one_clear_line(procs)
    assert "run dir is in use" in lines[0] and "process(es) 0 stopped at start" in lines[1], lines


@pytest.mark.slow
def test_process_killed_after_checkpoint(mp_inputs, tmp_path):
    """kill -9 of process 1 after the checkpoint of step 2: process 0 stops within STOP_S naming process 1, and the
    checkpoint resumes (2 processes again)."""
    stop_s = 30  # the collective fails at once on CPU (gloo); mesh.heartbeat_timeout_s=10 bounds a hang
    model, cache, env = mp_inputs
    run = tmp_path / "run"
    cmd = train_cmd(model, cache, run, "train.steps=400", "checkpoint.every_steps=2", "mesh.heartbeat_timeout_s=10")
    procs = start(cmd, 2, 4, cwd=ROOT, logs=tmp_path / "logs", env=env)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 400
    while not (ckpts / "2").is_dir() and time.monotonic() < deadline and all(p.popen.poll() is None for p in procs):
        time.sleep(0.2)
    if not all(p.popen.poll() is None for p in procs) or not (ckpts / "2").is_dir():
        kill(procs)
        pytest.fail(report(wait(procs, 1)))
    kill([procs[1]])
    t0 = time.monotonic()
    procs = wait(procs, timeout_s=stop_s + 30, grace_s=stop_s + 30)
    took = time.monotonic() - t0
    survivor = procs[0]
    assert survivor.returncode == 2 and not survivor.killed, report(procs)
    [line] = error_lines(survivor)
    assert "lost contact with process 1" in line and "last checkpoint is" in line, line
    assert took < stop_s, (took, line)
    last = int(line.split("last checkpoint is ")[1].split(";")[0].rstrip("/").rsplit("/", 1)[1])
    resumed = launch(train_cmd(model, cache, run, f"train.steps={last + 1}", "checkpoint.every_steps=2"), 2, 4,
                     cwd=ROOT, logs=tmp_path / "logs2", env=env, timeout_s=400)
    assert all(p.returncode == 0 for p in resumed), report(resumed)
    assert f"(step {last})" in resumed[0].output, report(resumed)
