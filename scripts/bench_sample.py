"""Sampling benchmark on CPU: denoising step time of our JAX pipeline vs diffusers' FluxKontextPipeline.

    python scripts/bench_sample.py [--layers 2] [--single-layers 4] [--heads 4] [--head-dim 64] [--size 256] \
        [--steps 8] [--threads 2 | --single-thread] [--json results.json]

A mid-size random Flux Kontext pipeline (``dreamomni2_jax.testing.tiny_flux1`` with a larger transformer: ``--layers`` double
and ``--single-layers`` single blocks, ``--heads`` x ``--head-dim``; tiny VAE / CLIP / T5) is written to a temp
folder and converted with ``convert/pipeline.py`` (float32). Both sides sample the same request (1 reference of
``--size``², output ``--size``², 512 T5 tokens, float32, guidance embedding) with the same initial latents.
Step time: diffusers = median wall time between ``callback_on_step_end`` calls (steps 2..N, no warm-up step);
ours = (second full ``denoise`` scan call) / steps (jit compiled by the first call; compile time reported apart).
Uses torch (reference side): a benchmark script, not on the runtime path.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--single-layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--single-thread", action="store_true",
                    help="one thread on both sides (torch threads 1, XLA CPU without the multi-threaded Eigen pool)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.single_thread:  # before jax is imported
        args.threads = 1
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from dreamomni2_jax.convert.pipeline import convert_pipeline
    from dreamomni2_jax.sample import pipeline as sampler
    from dreamomni2_jax.testing import tiny_flux1 as tiny

    torch.set_num_threads(args.threads)
    hd = args.head_dim
    rope = (hd - 2 * (hd * 7 // 16), hd * 7 // 16, hd * 7 // 16)  # Flux proportions (16, 56, 56) for 128
    size, steps = args.size, args.steps
    with tempfile.TemporaryDirectory() as tmp:
        src = tiny.build_pipeline(Path(tmp) / "src", num_layers=args.layers, num_single_layers=args.single_layers,
                                  num_attention_heads=args.heads, attention_head_dim=hd, axes_dims_rope=rope)
        conv = convert_pipeline(src, Path(tmp) / "conv", dtype="fp32", small_dtype="fp32", progress=False)
        ref = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
        tokens = (size // 16) ** 2
        lat = np.random.default_rng(1).standard_normal((1, tokens, 16)).astype(np.float32)
        prompt = "put the hat from image 2 on the person in image 1"

        tp = FluxKontextPipeline.from_pretrained(src, torch_dtype=torch.float32)
        stamps = []

        def cb(pipe, i, t, kw):
            stamps.append(time.perf_counter())
            return kw

        t0 = time.perf_counter()
        tp(image=ref, prompt=prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
           latents=torch.from_numpy(lat), output_type="np", max_area=size * size, _auto_resize=False,
           callback_on_step_end=cb)
        torch_total = time.perf_counter() - t0
        torch_step = statistics.median(np.diff(stamps))

        jp = sampler.load_pipeline(conv, jnp.float32)
        kw = dict(height=size, width=size, steps=steps, guidance=3.5, latents=lat, auto_resize=False,
                  max_area=size * size, progress=False)
        timings = []
        orig = sampler._denoise_jit

        def timed(*a, **k):
            t = time.perf_counter()
            out = jax.block_until_ready(orig(*a, **k))
            timings.append(time.perf_counter() - t)
            return out

        sampler._denoise_jit = timed  # time only the scan (not text / VAE)
        try:
            t0 = time.perf_counter()
            jp(prompt, [ref], **kw)
            first_total = time.perf_counter() - t0
            t0 = time.perf_counter()
            jp(prompt, [ref], **kw)
            jax_total = time.perf_counter() - t0
        finally:
            sampler._denoise_jit = orig
        jax_step = timings[1] / steps
        result = {
            "config": {"layers": args.layers, "single_layers": args.single_layers, "heads": args.heads,
                       "head_dim": hd, "size": size, "steps": steps, "image_tokens": 2 * tokens,
                       "text_tokens": 512, "dtype": "float32"},
            "machine": {"cpu": platform.processor() or platform.machine(), "jax": jax.__version__,
                        "torch": torch.__version__, "torch_threads": args.threads, "single_thread": args.single_thread,
                        "jax_devices": [str(d) for d in jax.devices()]},
            "diffusers_step_ms": round(1000 * torch_step, 1),
            "jax_step_ms": round(1000 * jax_step, 1),
            "speedup_diffusers_over_jax": round(torch_step / jax_step, 2),
            "diffusers_total_s": round(torch_total, 2),
            "jax_total_s_warm": round(jax_total, 2),
            "jax_first_call_s_incl_compile": round(first_total, 2),
            "jax_denoise_compile_s": round(timings[0] - timings[1], 2),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
