"""Lowering + compile time of the full-size Flux Kontext transformer (abstract, never executed).

    python scripts/bench_compile_flux.py [--img 8192] [--txt 512] [--grad] [--remat full] [--layers 19 38]

The model is built with ``nnx.eval_shape`` (no weights are allocated); inputs are ``jax.ShapeDtypeStruct``s. The
default shape is a 1024x1024 target plus one 1024x1024 reference (4096 + 4096 image tokens) and 512 text tokens.
``--grad`` lowers/compiles ``value_and_grad`` of a mean-square loss w.r.t. all params instead of the forward.
Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.models.flux import FluxConfig, abstract_flux


def run(layers: tuple[int, int], img: int, txt: int, grad: bool, remat: str, attention_impl: str) -> dict:
    cfg = FluxConfig(num_layers=layers[0], num_single_layers=layers[1])
    t0 = time.perf_counter()
    model = abstract_flux(cfg, remat=remat, attention_impl=attention_impl)
    graphdef, state = nnx.split(model)
    t_shape = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(state))
    f32, bf16 = jnp.float32, jnp.bfloat16
    sds = jax.ShapeDtypeStruct
    inputs = dict(hidden_states=sds((1, img, cfg.in_channels), bf16),
                  encoder_hidden_states=sds((1, txt, cfg.joint_attention_dim), bf16),
                  pooled_projections=sds((1, cfg.pooled_projection_dim), bf16),
                  timestep=sds((1,), f32), img_ids=sds((img, 3), jnp.int32), txt_ids=sds((txt, 3), jnp.int32),
                  guidance=sds((1,), f32))

    def forward(st, kw):
        return nnx.merge(graphdef, st)(**kw)

    def loss(st, kw):
        return jnp.mean(jnp.square(forward(st, kw).astype(f32)))

    fn = jax.jit(jax.value_and_grad(loss) if grad else forward)
    t0 = time.perf_counter()
    lowered = fn.lower(state, inputs)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return dict(layers=list(layers), img_tokens=img, txt_tokens=txt, grad=grad, remat=remat,
                attention_impl=attention_impl, params=int(n_params), eval_shape_s=round(t_shape, 2),
                lower_s=round(t_lower, 2), compile_s=round(t_compile, 2),
                temp_bytes_gib=None if temp is None else round(temp / 2**30, 2),
                backend=jax.default_backend(), jax=jax.__version__)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--img", type=int, default=8192, help="image tokens (target + references)")
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs=2, default=(19, 38), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--grad", action="store_true")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable", "dots_no_batch_saveable"))
    ap.add_argument("--attention", default="xla", choices=("xla", "cudnn", "auto"))
    args = ap.parse_args(argv)
    print(json.dumps(run(tuple(args.layers), args.img, args.txt, args.grad, args.remat, args.attention)), flush=True)


if __name__ == "__main__":
    main()
