"""The training loop's save / resume callback: periodic, final and preemption saves of a run directory."""
from __future__ import annotations

import logging
from pathlib import Path

import jax

from dreamomni2_jax.checkpoint.run_dir import BRANCHES, SUPERSEDED, branch_aside, trim_metrics, write_config
from dreamomni2_jax.checkpoint.store import CheckpointError, RunCheckpointer, open_run, read_config, resolve_checkpoint
from dreamomni2_jax.cli import UserError
from dreamomni2_jax.config import Config
from dreamomni2_jax.lora.layers import lora_metadata

log = logging.getLogger(__name__)


class CheckpointCallback:
    """Loop callback (``dreamomni2_jax.train.loop.Callback`` protocol): resume, periodic/final/preemption saves.

    ``on_start`` applies the module's resume semantics, restores ``ctx.state`` (its ``trainable()`` part),
    ``ctx.step``, ``ctx.rng`` and the data stream, then writes ``run_dir/config.json``. ``on_step_end`` saves every
    ``checkpoint.every_steps`` and stops the loop after a forced save once SIGTERM (or the multi-host preemption
    sync point) is seen; ``on_end`` saves the final step and waits for the writes. ``sigterm``: the entry point's
    :class:`~dreamomni2_jax.train.preemption.SigtermFlag` (None: only the multi-host sync point stops the loop).
    """

    def __init__(self, cfg: Config, resume: str | Path | None = None, branch: bool = False, sigterm=None,
                 after_save=None):
        self.cfg, self.resume, self.branch, self.sigterm = cfg, resume, branch, sigterm
        self.after_save = after_save  # RunCheckpointer(after_save=): called after each save (fault injection)
        self.ckpt: RunCheckpointer | None = None
        self.preempted_at: int | None = None

    def on_start(self, ctx) -> None:
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
