"""Cache stage: encode training images and instructions once (VAE latents, CLIP/T5 or Qwen3 embeddings).

    python scripts/cache.py --config configs/X.py --data MANIFEST.jsonl_OR_FOLDER --out CACHE_DIR \
        [--set model.path=CONVERTED_MODEL] [--skip-bad] [--enhance QWEN2_5_VL_DIR]

The model comes from ``model.path`` (a ``convert/pipeline.py`` output folder), encoders run in
``model.param_dtype`` data-parallel over this host's devices. Several hosts: run the same command on
every host (``jax.distributed.initialize()`` when ``mesh.distributed`` asks for it, as scripts/train.py),
with ``--out`` on storage every host sees; each encodes its share of the shards into the one cache.
Re-running the same command after an interruption (with any number of hosts) continues where it
stopped. Bad inputs stop the run with the file and manifest line named; ``--skip-bad`` skips them
instead and lists them in ``CACHE_DIR/skipped.jsonl``.
Then train with ``--set data.cache_dir=CACHE_DIR``. See :mod:`dreamomni2_jax.cache.stage` for the layout.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from dreamomni2_jax import families
from dreamomni2_jax.cache.records import CacheError
from dreamomni2_jax.cache.stage import build_cache
from dreamomni2_jax.config import ConfigError, load_config
from dreamomni2_jax.cache.inputs import TASKS
from dreamomni2_jax.images.io import BadInput


def main(argv: list[str] | None = None) -> int:
    from dreamomni2_jax import cli

    return cli.run(_main, argv)  # errors not handled below (damaged files, bad encodings): one line, exit 2


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="config file defining get_config()")
    ap.add_argument("--data", required=True, help="JSONL manifest or qflux-style folder")
    ap.add_argument("--out", required=True, help="cache folder (created; re-runs resume)")
    ap.add_argument("--set", action="append", default=[], metavar="section.key=value", help="config override")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad inputs (listed in OUT/skipped.jsonl)")
    ap.add_argument("--shard-size", type=int, default=256, help="records per ArrayRecord shard (default 256)")
    ap.add_argument("--image-batch", type=int, default=8, help="VAE batch (rounded up to the device count)")
    ap.add_argument("--text-batch", type=int, default=16, help="text-encoder batch")
    ap.add_argument("--enhance", default="", metavar="QWEN_DIR",
                    help="rewrite instructions with a Qwen2.5-VL model folder (needs torch; off by default)")
    ap.add_argument("--enhance-max-tokens", type=int, default=4096,
                    help="enhancer max new tokens (4096 as DreamOmni2's scripts; fewer can truncate the answer)")
    ap.add_argument("--task", default="editing", choices=TASKS,
                    help="task of records without a 'task' key and with references (default editing)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    # force: orbax/absl install root handlers on import; keep their INFO chatter off and ours on.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("dreamomni2_jax").setLevel(logging.INFO)
    if args.shard_size < 1:
        ap.error("--shard-size must be >= 1")
    try:
        cfg = load_config(args.config, args.set)
        if not cfg.model.path:
            raise ConfigError("model.path is empty: set it to a converted model folder (convert/pipeline.py)")
        from dreamomni2_jax import sharding

        sharding.initialize_distributed(cfg.mesh)  # before any other JAX call (several hosts: one cache)
        import jax

        process, nproc = jax.process_index(), jax.process_count()
        enhancer = None
        if args.enhance:
            from dreamomni2_jax.cache.enhance import QwenEnhancer

            enhancer = QwenEnhancer(args.enhance, max_new_tokens=args.enhance_max_tokens)

        def encoders():  # the model family (FLUX.1 / FLUX.2 [klein]) recorded in the converted folder
            return families.for_path(cfg.model.path).make_encoders(
                cfg.model.path, cfg.model.param_dtype, cfg.data.max_sequence_length, image_batch=args.image_batch,
                text_batch=args.text_batch)

        t0 = time.perf_counter()
        index = build_cache(cfg, args.data, args.out, encoders, skip_bad=args.skip_bad, shard_size=args.shard_size,
                            enhancer=enhancer, enhancer_name=args.enhance, default_task=args.task,
                            progress=not args.no_progress, processes=(process, nproc))
    except (BadInput, CacheError, ConfigError, FileNotFoundError) as e:
        hint = " (use --skip-bad to skip bad inputs)" if isinstance(e, BadInput) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    if process:  # process 0 reports the cache
        print(f"process {process} of {nproc}: done; {args.out} holds {index['num_records']} records")
        return 0
    print(f"cached {index['num_records']} records in {len(index['shards'])} shards to {args.out} "
          f"({time.perf_counter() - t0:.1f}s); skipped {index['num_skipped']}"
          + (f" (see {args.out}/skipped.jsonl)" if index["num_skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
