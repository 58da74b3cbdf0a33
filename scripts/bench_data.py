"""Data benchmarks on CPU: cache throughput (images/s) and loader throughput (batches/s).

    python scripts/bench_data.py [--out /tmp/bench_data] [--records 32] [--json results.json]

1. cache, tiny real encoders: the tiny random Flux pipeline (``dreamomni2_jax.testing.tiny_flux1``) converted with
   ``convert/pipeline.py``; demo-sized inputs (128x128 targets, 2 references); images/s of a
   second run (jit already compiled) and of the first (with compiles).
2. cache, null encoders at 1024x1024: real image decoding / Kontext resizing / record writing with
   encoders that return zeros of Flux dev shapes (latent 16 ch, T5 512x4096, bf16): the host-side
   cost of the stage without model compute.
3. loader, Flux dev record sizes: :class:`dreamomni2_jax.data.stream.CacheStream` over cache 2 (1024^2 target +
   2 references, bf16 latents, T5 512x4096 bf16), ``configs/gpu_h100.py`` batching (bucket, batch 8),
   0 and 2 worker processes; batches/s and MB/batch.
4. loader, demo: ``configs/demo.py`` data settings (pad, batch 2) over cache 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dreamomni2_jax.cache.stage import build_cache
from dreamomni2_jax.config import load_config
from dreamomni2_jax.data.stream import CacheStream

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


class NullEncoders:  # noqa: D101
    """Zeros of Flux dev shapes (bf16): measures everything but the model."""

    downscale, image_batch = 8, 8

    def __init__(self, channels=16, seq=512, t5_dim=4096, pooled=768):
        import ml_dtypes

        self.dtype, self.c, self.seq, self.t5_dim, self.pooled = ml_dtypes.bfloat16, channels, seq, t5_dim, pooled

    def encode_images(self, x):
        n, h, w, _ = x.shape
        return np.zeros((n, h // 8, w // 8, self.c), self.dtype)

    def encode_text(self, prompts):
        n = len(prompts)
        return np.zeros((n, self.seq, self.t5_dim), self.dtype), np.zeros((n, self.pooled), self.dtype)


def _with(cfg, **data):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


def bench_loader(cfg, cache, steps: int, workers: int) -> dict:
    stream = CacheStream(_with(cfg, cache_dir=str(cache), num_workers=workers))
    try:
        first = next(stream)  # start-up (worker spawn) excluded
        t0 = time.perf_counter()
        for _ in range(steps):
            next(stream)
        dt = time.perf_counter() - t0
    finally:
        stream.close()
    mb = sum(v.nbytes for v in first.values()) / 2**20
    return {"workers": workers, "batches_per_s": steps / dt, "ms_per_batch": 1000 * dt / steps, "mb_per_batch": mb,
            "shapes": {k: list(v.shape) for k, v in first.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench_data")
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    from support.fixtures_data import write_jsonl

    from dreamomni2_jax.convert.pipeline import convert_pipeline
    from dreamomni2_jax.testing import tiny_flux1 as tiny
    from dreamomni2_jax.cache.encoders import JaxEncoders

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    results = {}

    # 1. tiny real encoders, demo-sized images
    demo = load_config(REPO / "configs" / "demo.py")
    model = convert_pipeline(tiny.build_pipeline(out / "tiny"), out / "model", dtype="fp32", small_dtype="fp32",
                             progress=False)
    demo = dataclasses.replace(demo, model=dataclasses.replace(demo.model, path=str(model)))
    specs = [((128, 128), [(128, 128), (96, 128)])] * args.records
    manifest = write_jsonl(out / "demo_in", specs)
    n_img = sum(1 + len(r) for _, r in specs)
    enc = JaxEncoders(model, "float32", demo.data.max_sequence_length, image_batch=8, text_batch=8)
    runs = []
    for k in range(2):
        t0 = time.perf_counter()
        build_cache(demo, manifest, out / f"demo_cache{k}", enc, shard_size=64, progress=False)
        runs.append(time.perf_counter() - t0)
    results["cache_tiny_real"] = {"images": n_img, "first_run_images_per_s": n_img / runs[0],
                                  "warm_images_per_s": n_img / runs[1]}

    # 2. null encoders at 1024^2 (host-side cost of the stage)
    h100 = load_config(REPO / "configs" / "gpu_h100.py")
    big_specs = [((1024, 1024), [(1024, 1024), (1024, 1024)])] * args.records
    big_manifest = write_jsonl(out / "big_in", big_specs)
    t0 = time.perf_counter()
    build_cache(h100, big_manifest, out / "big_cache", NullEncoders(), shard_size=64, progress=False)
    dt = time.perf_counter() - t0
    results["cache_null_1024"] = {"images": 3 * args.records, "images_per_s": 3 * args.records / dt}

    # 3. / 4. loaders
    results["loader_flux_dev_sizes"] = [bench_loader(h100, out / "big_cache", args.steps, w) for w in (0, 2)]
    results["loader_demo"] = [bench_loader(demo, out / "demo_cache1", args.steps, w) for w in (0, 2)]
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
