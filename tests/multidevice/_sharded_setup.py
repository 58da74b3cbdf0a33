"""The tiny Flux training set-up the multi-device tests share (single device and sharded alike)."""
from __future__ import annotations

import numpy as np

from dreamomni2_jax.layout.ids_flux1 import SampleLayout as S

# Padded multi-reference layouts (latent sizes): 1..3 references of different sizes.
LAYOUTS = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
           S((2, 4), ((4, 4), (4, 4), (2, 2)))]


def tiny_batch(layouts, seed: int = 0) -> dict[str, np.ndarray]:
    """A random training batch for the tiny Flux (packed width 16, text 4 x 32, pooled 32)."""
    from dreamomni2_jax.data import stream as data

    return data.synthetic_batch(np.random.default_rng(seed), layouts, channels=16, text_len=4, text_dim=32,
                                pooled_dim=32)


def adapted_tiny_flux(lora, mesh=None, **model_kwargs):
    """:func:`tiny.flux_model` (sharded at creation on ``mesh``) with fresh adapters of ``lora`` (seed 1)."""
    from dreamomni2_jax import sharding as shd
    from dreamomni2_jax.lora.attach import attach_lora
    from dreamomni2_jax.testing.tiny_flux1 import flux_model

    build = lambda: flux_model(0, **model_kwargs)  # noqa: E731
    model = build() if mesh is None else shd.init_sharded(build, mesh)
    attach_lora(model, config=lora, seed=1)
    return model


def train_state(cfg, model, mesh=None, ema: bool = False, total_steps: int = 10):
    """``(statics, state)`` of ``model`` with the optimizer of ``cfg`` built once."""
    from dreamomni2_jax.train import step as ts
    from dreamomni2_jax.train.optimizers import make_optimizer

    tx = make_optimizer(cfg.optim, total_steps)
    graphdef, state = ts.init_train_state(model, tx, mesh=mesh, ema=ema)
    return ts.make_statics(graphdef, cfg, tx=tx, guidance_embeds=True, mesh=mesh), state
