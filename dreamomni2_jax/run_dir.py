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

import jax

from dreamomni2_jax.atomic_write import write_text
from dreamomni2_jax.checkpoint import (
    CheckpointError, RunCheckpointer, complete_steps, open_run, read_config, resolve_checkpoint,
)
from dreamomni2_jax.cli import UserError
from dreamomni2_jax.config import Config

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


class CheckpointCallback:
    """Loop callback (``dreamomni2_jax.loop.Callback`` protocol): resume, periodic/final/preemption saves.

    ``on_start`` applies the module's resume semantics, restores ``ctx.state`` (its ``trainable()`` part),
    ``ctx.step``, ``ctx.rng`` and the data stream, then writes ``run_dir/config.json``. ``on_step_end`` saves every
    ``checkpoint.every_steps`` and stops the loop after a forced save once SIGTERM (or the multi-host preemption
    sync point) is seen; ``on_end`` saves the final step and waits for the writes. ``sigterm``: the entry point's
    :class:`~dreamomni2_jax.preemption.SigtermFlag` (None: only the multi-host sync point stops the loop).
    """

    def __init__(self, cfg: Config, resume: str | Path | None = None, branch: bool = False, sigterm=None,
                 after_save=None):
        self.cfg, self.resume, self.branch, self.sigterm = cfg, resume, branch, sigterm
        self.after_save = after_save  # RunCheckpointer(after_save=): called after each save (fault injection)
        self.ckpt: RunCheckpointer | None = None
        self.preempted_at: int | None = None

    def on_start(self, ctx) -> None:
        from dreamomni2_jax.lora import lora_metadata

        run_dir = Path(self.cfg.train.run_dir).absolute()
        main = jax.process_index() == 0
        self.ckpt = open_run(run_dir, self.cfg, adapter=lora_metadata(ctx.model()), after_save=self.after_save)
        try:
            self._resume(ctx, run_dir, main)
        except BaseException:
            self.ckpt.close()
            raise
        if main:
            write_config(self.cfg, run_dir)

    def _resume(self, ctx, run_dir: Path, main: bool) -> None:
        if self.resume:
            root, step = resolve_checkpoint(self.resume)
            source = RunCheckpointer(root.parent, read_only=True, async_save=False, root=root)
        else:
            source, step = self.ckpt, self.ckpt.latest_step()
        if step is None:
            return
        later = [s for s in self.ckpt.all_steps() if s > step]
        if later and not self.branch:
            if source is not self.ckpt:
                source.close()
            raise UserError(f"{self.ckpt.root} has checkpoints after step {step} ({later}); resuming from step "
                            f"{step} would overwrite that history. Pass --branch to move them to "
                            f"{run_dir / BRANCHES}/ and continue from step {step}, or set train.run_dir to a new "
                            "folder to fork")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                ctx.state.trainable())
        try:
            state, data_state, rng, step = source.restore(step, abstract)
            saved_cfg = read_config(source.step_dir(step))
        finally:
            if source is not self.ckpt:
                source.close()
        _warn_config_changes(saved_cfg, self.cfg)
        if data_state is not None:
            try:
                ctx.stream.set_state(data_state)
            except ValueError as e:
                raise CheckpointError(f"{source.step_dir(step) / 'data'}: {e}; resume with the data settings of "
                                      "that run (data.batch_size, data.shuffle_seed, data.cache_dir, ...) or start "
                                      "a new train.run_dir") from None
        if main:  # everything checked: only now touch the run directory
            if later:
                branch_aside(run_dir, self.ckpt.root, step)
            moved = trim_metrics(run_dir, step)
            if moved:
                log.info("metrics.jsonl: %d record(s) after step %d moved to %s", moved, step, SUPERSEDED)
        if later:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("dreamomni2_branch_aside")
            self.ckpt.reload()
        ctx.state = ctx.state.replace_trainable(state)
        if rng is not None:
            ctx.rng = rng
        ctx.step = step
        log.info("resumed from %s (step %d)", source.step_dir(step), step)

    def _save(self, ctx, force: bool) -> bool:
        return self.ckpt.save(ctx.step, ctx.state.trainable(), ctx.stream.get_state(), ctx.rng, force=force)

    def on_step_end(self, ctx, metrics) -> bool:
        self._save(ctx, force=False)
        if self.ckpt.should_stop(ctx.step, self.sigterm is not None and self.sigterm.raised):
            saved = self._save(ctx, force=True) or ctx.step in self.ckpt.all_steps()
            self.preempted_at = ctx.step
            if saved:
                log.warning("preempted: checkpoint of step %d saved in %s; stopping", ctx.step, self.ckpt.root)
            else:
                log.error("preempted: the state of step %d was NOT saved (see above); the latest checkpoint is "
                          "step %s; stopping", ctx.step, self.ckpt.latest_step())
            return True
        return False

    def on_end(self, ctx) -> None:
        try:
            self._save(ctx, force=True)
        finally:
            self.ckpt.close()


def _warn_config_changes(saved: Config, now: Config) -> None:
    a, b = saved.to_dict(), now.to_dict()
    changed = [f"{sec}.{k}: {a[sec].get(k)!r} -> {v!r}" for sec in b for k, v in b[sec].items()
               if a.get(sec, {}).get(k) != v]
    if changed:
        log.warning("resuming with a changed config: %s", "; ".join(changed))


__all__ = ["RunLock", "CheckpointCallback", "trim_metrics", "branch_aside", "write_config"]
