"""The FLUX.2 [klein] train step on a (data 2, fsdp 2, tensor 2) mesh with full remat, 2 gradient-accumulation
micro-batches and adapter EMA equals the single-device step (tiny ``Flux2Transformer2DModel``)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamomni2_jax.data import stream as data
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.config import Config, LoraConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from dreamomni2_jax.models.flux2 import Flux2Config, Flux2Transformer2DModel
from dreamomni2_jax.train.optimizers import make_optimizer
from dreamomni2_jax.layout.ids_flux1 import SampleLayout as S
from dreamomni2_jax.testing.tiny_klein import FLUX2_TINY

TARGETS = (r"attn\.to_q$", r"attn\.to_v$", r"attn\.to_qkv_mlp_proj", r"attn\.to_out")
CFG = Config(model=ModelConfig(remat="full"),
             lora=LoraConfig(rank=4, alpha=8.0, preset="custom", targets=TARGETS),
             optim=OptimConfig(lr=1e-2, grad_accum=2), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
             train=TrainConfig(ema_decay=0.9))
LAYOUTS = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
           S((2, 4), ((4, 4), (4, 4), (2, 2)))] * 2


def _run(batch, mesh, accum):
    c = dataclasses.replace(CFG, optim=dataclasses.replace(CFG.optim, grad_accum=accum))

    def build():
        return Flux2Transformer2DModel(Flux2Config.from_dict(FLUX2_TINY), rngs=nnx.Rngs(0), dtype=jnp.float32,
                                       param_dtype=jnp.float32, remat="full" if mesh is not None else "none")

    model = build() if mesh is None else shd.init_sharded(build, mesh)
    attach_lora(model, config=c.lora, seed=1)
    tx = make_optimizer(c.optim, 10)
    graphdef, state = ts.init_train_state(model, tx, mesh=mesh, ema=True)
    statics = ts.make_statics(graphdef, c, tx=tx, guidance_embeds=False, mesh=mesh)
    step = ts.compile_train_step(statics, state, batch)
    b = batch if mesh is None else shd.put_batch(batch, mesh)
    for i in range(2):
        state, m = step(state, b, jax.random.key(i))
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.lora)} if mesh is not None else set()
    return float(m["loss"]), [np.asarray(x) for x in jax.tree.leaves(state.lora)], specs


def test_klein_step_sharded_remat_accum_matches_single_device():
    batch = data.synthetic_batch(np.random.default_rng(0), LAYOUTS, channels=16, text_len=4, text_dim=96,
                                 pooled_dim=0, scheme="flux2")
    loss1, lora1, _ = _run(batch, None, 1)
    loss8, lora8, specs = _run(batch, shd.make_mesh(CFG.mesh), 2)
    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(lora8, lora1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any("fsdp" in s or "tensor" in s for s in specs), specs
