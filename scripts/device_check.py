"""On one NVIDIA GPU: cuDNN attention vs XLA (bf16, padding masks, fewer queries than keys; values and gradients)
and one full-size (FLUX.1 Kontext dev, random weights) sampler step at 1024^2; writes one JSON.

    python scripts/device_check.py --json out.json [--layers DOUBLE SINGLE] [--refs 1]

Run by ``scripts/device_check.sh`` (which also times the full train step with ``scripts/bench.py``). ``--layers``
shrinks the model (a smoke run of this script on any machine; the attention part needs a GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def attention_check(sq: int, s: int, heads: int = 24, head_dim: int = 128, batch: int = 2) -> dict:
    """cuDNN (keys reordered real-first + lengths, inside the dispatch) vs the masked XLA implementation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dreamomni2_jax.models.attention import attention

    rng = np.random.default_rng(0)
    q, do = (jnp.asarray(rng.standard_normal((batch, sq, heads, head_dim)), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((batch, s, heads, head_dim)), jnp.bfloat16) for _ in range(2))
    mask = np.ones((batch, s), bool)
    mask[0, 512 + 3000:512 + 4096] = False  # padded end of the target section, real references after it
    mask[1, s - 700:] = False

    def run(impl):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, jnp.asarray(mask), impl).astype(jnp.float32)  # noqa: E731
                                    * do.astype(jnp.float32))
        out = jax.jit(lambda q, k, v: attention(q, k, v, jnp.asarray(mask), impl))(q, k, v)
        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    ours, ref = run("cudnn"), run("xla")
    res = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        err = float(np.abs(a - b).max())
        res[name] = {"max_abs_err": err, "rel_err": err / max(float(np.abs(b).max()), 1e-6)}
    res["ok"] = all(r["rel_err"] < 3e-2 for r in res.values() if isinstance(r, dict))
    return res


def sampler_step(layers, refs: int, size: int = 1024) -> dict:
    """One denoising step of the full-size model (random weights, LoRA) at ``size``^2 with ``refs`` references."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dreamomni2_jax.tools import aot
    from dreamomni2_jax import sharding as shd
    from dreamomni2_jax.config import load_config
    from dreamomni2_jax.lora.attach import attach_lora
    from dreamomni2_jax.models.flux import FluxTransformer2DModel
    from dreamomni2_jax.sample.pipeline import _denoise_jit

    cfg = load_config("configs/gpu_h100.py", ["mesh.fsdp=1"])
    impl = cfg.model.attention if jax.devices()[0].platform == "gpu" else "auto"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, synthetic_resolution=(size, size),
                                                            synthetic_refs=((size, size),) * refs),
                              model=dataclasses.replace(cfg.model, attention=impl))
    fc = aot.flux_config(cfg, layers)
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])

    def build():
        m = FluxTransformer2DModel(fc, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                   attention_impl=cfg.model.attention)
        attach_lora(m, config=cfg.lora, seed=0, fresh=True)
        return m

    model = shd.init_sharded(build, mesh)
    model.eval()
    graphdef, state = nnx.split(model)
    shapes, tokens = aot.sample_input_shapes(cfg, fc, 1, steps=1)
    rng = np.random.default_rng(0)
    inputs = [None if x is None else jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) if x.dtype != jnp.int32
                                                 else np.zeros(x.shape, np.int32), x.dtype) for x in shapes]
    inputs[7], inputs[8] = jnp.asarray([1000.0]), jnp.asarray([1.0, 0.0])  # timesteps, sigmas

    def call():
        return jax.block_until_ready(_denoise_jit(graphdef, state, *inputs, tick=lambda i: None, mesh=mesh))

    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    return {"references": refs, "size": size, "tokens": tokens, "attention": cfg.model.attention,
            "compile_and_first_s": t1 - t0, "step_s": sorted(times)[1], "finite": bool(np.isfinite(np.asarray(out)).all()),
            "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--layers", nargs=2, type=int, default=None)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--size", type=int, default=1024, help="sampler image size (pixels; smoke runs: smaller)")
    args = ap.parse_args(argv)
    import jax

    out = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform}
    if out["platform"] == "gpu":
        out["attention_target_only"] = attention_check(4096, 512 + 4096 * 2)  # the last block: target queries
        out["attention_full"] = attention_check(512 + 4096 * 2, 512 + 4096 * 2)
    out["sampler_step"] = sampler_step(tuple(args.layers) if args.layers else None, args.refs, args.size)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    ok = all(out[k]["ok"] for k in ("attention_target_only", "attention_full") if k in out)
    return 0 if ok and out["sampler_step"]["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
