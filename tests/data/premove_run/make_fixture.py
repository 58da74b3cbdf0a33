"""Regenerate the pre-move run fixture ``tests/data/premove_run/run`` (see README.md next to this file).

Written for the pre-move flat package (commit d9c5347: ``dreamomni2_jax.tiny``, ``dreamomni2_jax.cache``, ...);
it also runs on the post-move layout (``dreamomni2_jax.testing.tiny_flux1``, ``dreamomni2_jax.cache.stage``, ...)
so that both codes can be compared on the same inputs. The checkout whose package is imported (its
``scripts/train.py``) is the one that trains:

    git worktree add --detach /tmp/old d9c5347
    JAX_PLATFORMS=cpu PYTHONPATH=/tmp/old python tests/data/premove_run/make_fixture.py \
        --work /tmp/premove_work --out tests/data/premove_run/run

Steps (the same inputs as the session fixtures of tests/conftest.py and tests/support/fixtures_data.py):
tiny random pipeline (seed 0, guidance embedder) -> convert_pipeline (fp32) -> write_jsonl(<work>/data/in) -> cache
(tiny_config's data settings, shards of 4 records) -> ``scripts/train.py --config train_config.py`` for 4 steps
(checkpoints at steps 2 and 4) -> the run directory, without its lock file, copied to ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
KEEP = ("config.json", "metrics.jsonl", "checkpoints")  # all a resume / export reads; nothing else is written here


def _imports():
    """(build_pipeline, write_jsonl, convert_pipeline, JaxEncoders, build_cache) of whichever layout is imported."""
    try:  # pre-move flat package (d9c5347)
        from dreamomni2_jax.cache import build_cache
        from dreamomni2_jax.cache_encoders import JaxEncoders
        from dreamomni2_jax.tiny import build_pipeline, write_jsonl
    except ImportError:  # post-move sub-packages
        from dreamomni2_jax.cache.encoders import JaxEncoders
        from dreamomni2_jax.cache.stage import build_cache
        from dreamomni2_jax.testing.tiny_flux1 import build_pipeline, write_jsonl
    from dreamomni2_jax.convert.pipeline import convert_pipeline

    return build_pipeline, write_jsonl, convert_pipeline, JaxEncoders, build_cache


def build_inputs(work: Path) -> tuple[Path, Path]:
    """The tiny converted model and cache, exactly as tests/support/fixtures_data.py builds them -> (model, cache)."""
    from dreamomni2_jax.config import Config, DataConfig, ModelConfig

    build_pipeline, write_jsonl, convert_pipeline, JaxEncoders, build_cache = _imports()
    pipe = build_pipeline(work / "tiny" / "flux-kontext", seed=0, guidance_embeds=True)
    model = convert_pipeline(pipe, work / "conv" / "model", dtype="fp32", small_dtype="fp32", progress=False)
    encoders = JaxEncoders(model, "float32", max_sequence_length=32, image_batch=4, text_batch=4)
    manifest = write_jsonl(work / "data" / "in")
    cache = work / "data" / "cache"
    cfg = Config(model=ModelConfig(path=str(model), param_dtype="float32", compute_dtype="float32"),
                 data=DataConfig(cache_dir=str(cache), batch_size=2, max_refs=3, target_max_area=96 * 96,
                                 reference_max_area=96 * 96, min_image_size=32, batching="bucket", num_workers=0,
                                 max_sequence_length=32, synthetic_resolution=(96, 64),
                                 synthetic_refs=((64, 64), (96, 96))))
    build_cache(cfg, manifest, cache, encoders, shard_size=4, progress=False)
    return Path(model), cache


def train(run: Path, model: Path, cache: Path, *extra: str) -> int:
    """``scripts/train.py`` of the checkout whose package is imported, in this process."""
    import dreamomni2_jax

    script = Path(dreamomni2_jax.__file__).resolve().parents[1] / "scripts" / "train.py"
    spec = importlib.util.spec_from_file_location("_train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--config", str(HERE / "train_config.py"), "--set", f"model.path={model}",
                        "--set", f"data.cache_dir={cache}", "--set", f"train.run_dir={run}", "--no-progress",
                        *extra])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path, help="scratch folder (must not exist)")
    ap.add_argument("--out", required=True, type=Path, help="where the run directory goes (must not exist)")
    args = ap.parse_args(argv)
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; remove it first")
    model, cache = build_inputs(args.work)
    run = args.work / "run"
    if train(run, model, cache) != 0:
        sys.exit("error: training failed")
    args.out.mkdir(parents=True)
    for name in KEEP:
        src = run / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, args.out / name)
    left = sorted(p.name for p in run.iterdir() if p.name not in KEEP)
    print(f"wrote {args.out} (left out: {left}); losses:",
          {json.loads(x)["step"]: json.loads(x)["loss"] for x in (args.out / "metrics.jsonl").read_text().splitlines()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
