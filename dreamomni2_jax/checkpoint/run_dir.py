"""One training run directory: its lock, resume / branch semantics, metrics and config files.

Resume semantics (what ``scripts/train.py`` does with ``train.run_dir`` = RUN):

* no ``--resume``: continue from RUN's latest checkpoint (a damaged latest step is an error that names the newest
  intact one; nothing falls back silently);
* ``--resume PATH`` (a step of this or another run): continue from that step. If RUN already has checkpoints
  *after* it, resuming would overwrite that history, so the run is refused unless ``--branch`` is given: then the
  later steps and their metrics are moved to ``RUN/branches/<UTC time>-from-<step>/`` (nothing is deleted) and
  training continues from the chosen step. To keep RUN untouched, point ``train.run_dir`` at a new folder instead
  (a fork).
* ``metrics.jsonl`` holds one record per step: on resume, records after the restored step (steps that will be
  redone) are moved to ``metrics.superseded.jsonl`` (or into the branch folder).
* ``config.json`` is written only once the resume is accepted, so a refused resume leaves the run as it was.
* Only one ``train.py`` may use RUN at a time (an advisory lock on ``RUN/.lock``, released when the process dies).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path

from dreamomni2_jax.checkpoint.store import complete_steps
from dreamomni2_jax.cli import UserError
from dreamomni2_jax.config import Config
from dreamomni2_jax.utils.atomic_write import write_text

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
METRICS = "metrics.jsonl"
SUPERSEDED = "metrics.superseded.jsonl"
BRANCHES = "branches"


class RunLock:
    """Exclusive advisory lock on ``run_dir/.lock`` (``fcntl.flock``: released by the OS if the process dies)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"{self.path.parent}: run dir is in use by another training process ({holder}); "
                                "wait for it to finish, stop it, or use another train.run_dir") from None
            os.close(fd)  # filesystem without locks (some network mounts): say so, carry on
            log.warning("%s: cannot lock (%s); make sure no other run uses this folder", self.path, e)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def write_config(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.json", cfg.to_json())


def _records(path: Path) -> list[tuple[int | None, str]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            step = None  # a torn last line of a killed run: superseded like a later step
        out.append((step, line))
    return out


def trim_metrics(run_dir: Path, step: int, moved_to: Path | None = None) -> int:
    """Keep the records of steps ``<= step`` in ``metrics.jsonl``; append the others to ``moved_to`` (default
    ``metrics.superseded.jsonl``). Returns how many records moved."""
    path = run_dir / METRICS
    if not path.is_file():
        return 0
    keep, drop = [], []
    for s, line in _records(path):
        (keep if s is not None and s <= step else drop).append(line)
    if not drop:
        return 0
    moved_to = moved_to or run_dir / SUPERSEDED
    moved_to.parent.mkdir(parents=True, exist_ok=True)
    with open(moved_to, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in drop))
    write_text(path, "".join(line + "\n" for line in keep))
    return len(drop)


def branch_aside(run_dir: Path, root: Path, step: int) -> Path:
    """Move the checkpoints of ``root`` after ``step`` and the metrics after it into a new branch folder."""
    later = [s for s in complete_steps(root) if s > step]
    dest = run_dir / BRANCHES / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-from-{step}"
    (dest / "checkpoints").mkdir(parents=True, exist_ok=False)
    for s in later:
        os.rename(root / str(s), dest / "checkpoints" / str(s))
    trim_metrics(run_dir, step, dest / METRICS)
    log.warning("--branch: checkpoints %s and their metrics moved to %s; continuing from step %d", later, dest, step)
    return dest


__all__ = ["RunLock", "trim_metrics", "branch_aside", "write_config"]
