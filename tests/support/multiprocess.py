"""The one launcher of the multi-process tests: N copies of a command joined by JAX's distributed runtime on loopback.

Each copy gets what ``mpirun -np N`` would set (Open MPI's ``OMPI_*`` variables, which the project detects as a
multi-host launcher and JAX's own cluster detection reads for the process id and count), plus
``JAX_COORDINATOR_ADDRESS`` on a free loopback port, its own fake CPU devices
(``--xla_force_host_platform_device_count``) and ``JAX_LOCAL_DEVICE_IDS``. CPU collectives go through gloo.

Every launch has a hard timeout: when it runs out (or when one process fails and the others do not stop within
``grace_s``), every process of the group is killed, so a test can fail but never hang CI.

    procs = launch([sys.executable, "scripts/train.py", ...], nproc=2, devices=4, cwd=ROOT, timeout_s=300)
    assert all(p.returncode == 0 for p in procs), report(procs)

``{rank}`` in an argument of the command is replaced by the process's rank (a per-process ``--set``, e.g. run
directories that differ); ``start(..., ranks=[1])`` starts only some ranks of the group (the others never come).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, nproc: int, devices: int, port: int, base: Mapping[str, str] | None = None) -> dict:
    """The environment of process ``rank`` of ``nproc`` (``devices`` fake CPU devices each)."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({
        "OMPI_MCA_orte_hnp_uri": f"1234.0;tcp://127.0.0.1:{port}",
        "OMPI_COMM_WORLD_SIZE": str(nproc), "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(nproc),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_LOCAL_DEVICE_IDS": ",".join(str(i) for i in range(devices)),
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        "JAX_PLATFORMS": "cpu",
    })
    return env


@dataclass
class Proc:
    rank: int
    popen: subprocess.Popen
    log: Path
    returncode: int | None = None
    killed: bool = False
    output: str = field(default="", repr=False)


def start(cmd: Sequence[str], nproc: int, devices: int, *, cwd: Path, logs: Path,
          env: Mapping[str, str] | None = None, port: int | None = None,
          ranks: Sequence[int] | None = None) -> list[Proc]:
    """Start the group (or only ``ranks`` of it); each process writes stdout + stderr to ``logs/proc<rank>.log``;
    ``{rank}`` in an argument becomes the rank."""
    logs.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    procs = []
    for rank in (range(nproc) if ranks is None else ranks):
        log = logs / f"proc{rank}.log"
        with open(log, "w") as fh:
            args = [str(a).replace("{rank}", str(rank)) for a in cmd]
            p = subprocess.Popen(args, cwd=cwd, env=process_env(rank, nproc, devices, port, env), stdout=fh,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(Proc(rank, p, log))
    return procs


def kill(procs: Sequence[Proc], sig: int = signal.SIGKILL) -> None:
    for p in procs:
        if p.popen.poll() is None:
            try:
                os.killpg(p.popen.pid, sig)
            except ProcessLookupError:
                pass


def wait(procs: Sequence[Proc], timeout_s: float, grace_s: float = 60.0,
         until: Callable[[], bool] | None = None) -> list[Proc]:
    """Wait for every process to end; kill the whole group on the timeout, or when one process failed and the others
    are still running ``grace_s`` later. Returns ``procs`` with return codes and outputs.

    With ``until``: return as soon as ``until()`` is true, leaving the processes running (return codes None), so a
    test can then signal them (:func:`kill`) and :func:`wait` again; the timeout still kills the group."""
    deadline = time.monotonic() + timeout_s
    failed_at = None
    while True:
        codes = [p.popen.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        if until is not None and until():
            return list(procs)
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > grace_s):
            for p in procs:
                p.killed = p.popen.poll() is None
            kill(procs)
            break
        time.sleep(0.2)
    for p in procs:
        try:
            p.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill([p])
            p.popen.wait()
        p.returncode = p.popen.returncode
        p.output = p.log.read_text(errors="replace")
    return list(procs)


def launch(cmd: Sequence[str], nproc: int, devices: int, *, cwd: Path, logs: Path, timeout_s: float,
           env: Mapping[str, str] | None = None, grace_s: float = 60.0) -> list[Proc]:
    """:func:`start` then :func:`wait`."""
    return wait(start(cmd, nproc, devices, cwd=cwd, logs=logs, env=env), timeout_s, grace_s)


def report(procs: Sequence[Proc], tail: int = 3000) -> str:
    """The end of every process's output, for an assertion message."""
    return "\n".join(f"--- process {p.rank}: exit {p.returncode}{' (killed at the timeout)' if p.killed else ''}\n"
                     f"{p.output[-tail:]}" for p in procs)
