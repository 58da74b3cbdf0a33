"""Train a DreamOmni2 / Flux Kontext LoRA.

    python scripts/train.py --config configs/tpu_v5.py [--set section.key=value ...] [--print-config]

``model.path``: a converted model folder (``convert/pipeline.py`` output, with ``transformer/``) or a transformer
checkpoint itself. ``data.cache_dir`` empty -> synthetic batches (smoke runs / throughput). Multi-host: run the
same command on every host; ``jax.distributed.initialize()`` happens when ``mesh.distributed`` asks for it, then
every process checks that the config is the same everywhere and that ``train.run_dir`` is shared
(:mod:`dreamomni2_jax.multihost`); a process lost mid-run stops the others with one line (README "Pods and
clusters").
Writes ``train.run_dir/metrics.jsonl`` (one JSON record per step), ``config.json``, checkpoints (resumed from
the latest one automatically) and, with ``sample.every_steps`` > 0, validation samples.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dreamomni2_jax.config import ConfigError, load_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--config", required=True, help="Python config file defining get_config()")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    ap.add_argument("--resume", default=None, metavar="PATH", help="checkpoint (run dir, checkpoints/ or step dir) to "
                    "resume from; default: the latest checkpoint of train.run_dir, if any")
    ap.add_argument("--branch", action="store_true", help="with --resume to an earlier step of train.run_dir: move "
                    "the later checkpoints and metrics to run_dir/branches/ and continue from that step")
    return ap.parse_args(argv)


def _validation(cfg) -> list:
    """The validation-sampling callback when ``sample.every_steps`` > 0 (needs the full converted model folder)."""
    if cfg.sample.every_steps <= 0:
        return []
    from dreamomni2_jax.callbacks.validation import make_validation_callback

    return [make_validation_callback(cfg, None, cfg.model.path, cfg.train.run_dir)]


def _held_out(cfg) -> list:
    """The held-out loss callback when ``train.eval_every`` > 0."""
    if cfg.train.eval_every <= 0:
        return []
    from dreamomni2_jax.callbacks.eval_loss import EvalLossCallback

    return [EvalLossCallback(cfg)]


def main(argv=None, callbacks=(), after_save=None) -> int:
    """Entry point; extra ``loop.Callback`` objects run after checkpointing and validation; ``after_save``: see
    ``checkpoint.RunCheckpointer``. User errors (bad config, data or checkpoint, refused resume, busy run dir): one
    line on stderr, exit code 2."""
    from dreamomni2_jax import cli

    args = parse_args(argv)
    return cli.run(lambda _: _main(args, callbacks, after_save))


def _main(args, callbacks, after_save=None) -> int:
    from dreamomni2_jax.families import resolve_config

    cfg = resolve_config(load_config(args.config, args.set))  # settings the model family fixes (FLUX.2 ids)
    if args.print_config:
        print(cfg.to_json())
        return 0
    if args.branch and not args.resume:
        raise ConfigError("--branch needs --resume PATH (the step to continue from)")

    from dreamomni2_jax import sharding

    sharding.initialize_distributed(cfg.mesh)  # before any other JAX call
    import jax

    if jax.process_count() > 1:  # every process: the same config, one run dir that every host sees
        from dreamomni2_jax import multihost

        multihost.check_same_config(cfg)
        multihost.check_shared_run_dir(cfg.train.run_dir)
    return _train(cfg, args, callbacks, after_save)


def _exit_if_lost(err, cfg) -> None:
    """With several processes, a runtime error of a collective that says a peer is gone (it died or is unreachable)
    -> one line and exit code 2 at once: ``os._exit`` skips the runtime's shutdown barrier and pending checkpoint
    writes, which would wait for the lost process (the last finalized checkpoint stays intact; an unfinished save
    is a temporary folder). Returns for any other error."""
    import os

    import jax

    from dreamomni2_jax import multihost

    if jax.process_count() == 1 or not multihost.is_lost_process_error(err):
        return
    from dreamomni2_jax.checkpoint.store import CHECKPOINTS_DIR, complete_steps

    root = Path(cfg.train.run_dir).absolute() / CHECKPOINTS_DIR
    steps = complete_steps(root)
    print(f"error: {multihost.lost_process_message(err, str(root / str(steps[-1])) if steps else None)}",
          file=sys.stderr, flush=True)
    os._exit(2)


def _train(cfg, args, callbacks, after_save) -> int:
    import jax

    from dreamomni2_jax import cli
    from dreamomni2_jax.train import loop
    from dreamomni2_jax.train.preemption import SigtermFlag
    from dreamomni2_jax.callbacks.checkpoint import CheckpointCallback
    from dreamomni2_jax.checkpoint.run_dir import RunLock

    main_process = jax.process_index() == 0
    # force: orbax/absl install root handlers on import; their INFO chatter stays off, ours is on (process 0).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("dreamomni2_jax").setLevel(logging.INFO if main_process else logging.WARNING)
    log = logging.getLogger("dreamomni2_jax.train")
    from dreamomni2_jax.multihost import agreed

    # process 0 holds the run dir's lock; a busy run dir stops every process (none waits for process 0)
    lock = agreed(lambda: RunLock(cfg.train.run_dir).acquire() if main_process else None)
    try:
        if main_process:
            log.info("%d process(es), %d devices (%s)", jax.process_count(), jax.device_count(),
                     jax.devices()[0].device_kind)
        try:
            ctx = loop.setup(cfg)
        except jax.errors.JaxRuntimeError as e:
            _exit_if_lost(e, cfg)
            raise
        except ValueError as e:  # model / data / mesh that do not fit the config: named in the message
            raise cli.UserError(str(e)) from None
        if main_process:
            log.info("mesh %s; global batch %d (%d per process)", dict(ctx.mesh.shape), cfg.data.batch_size,
                     cfg.data.batch_size // jax.process_count())
        sigterm = SigtermFlag()  # SIGTERM -> save and exit 0 (this process only; installed here, not by the library)
        ckpt = CheckpointCallback(cfg, resume=args.resume, branch=args.branch, sigterm=sigterm, after_save=after_save)
        try:
            with sigterm:
                loop.train(ctx, [ckpt, *_validation(cfg), *_held_out(cfg), *callbacks],
                           progress=not args.no_progress)
        except loop.NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        except jax.errors.JaxRuntimeError as e:  # before the finally below: closing would wait for a lost process
            _exit_if_lost(e, cfg)
            raise
        finally:
            if ckpt.ckpt is not None:
                ckpt.ckpt.close()  # pending saves of good states complete; no background thread is left behind
    finally:
        if lock is not None:
            lock.release()
    if main_process:
        log.info("done: %d steps, run dir %s", ctx.step, cfg.train.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
