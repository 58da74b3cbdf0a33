"""Exponential moving average of the adapters (``train.ema_decay`` > 0).

After each applied (finite) update ``n`` (0-based), ``ema = d * ema + (1 - d) * adapters`` with ``d =
ema_decay``, or ``min(ema_decay, (1 + n) / (10 + n))`` with ``train.ema_warmup`` (the warm-up of diffusers'
``EMAModel``). A skipped (non-finite) step leaves it unchanged. The EMA starts as a copy of the initial adapters,
lives in ``TrainState.ema`` with the adapters' shardings and is saved in checkpoints next to them (``"ema"``), so a
resume continues it exactly. ``convert/export_lora.py --ema`` exports it; ``sample.use_ema`` samples with it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def decay_at(applied: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The decay of update number ``applied`` (0-based count of updates applied before it)."""
    d = jnp.asarray(decay, jnp.float32)
    if warmup:
        n = applied.astype(jnp.float32)
        d = jnp.where(n > 0, jnp.minimum(d, (1.0 + n) / (10.0 + n)), 0.0)
    return d


def update(ema, params, decay: jax.Array):
    """``decay * ema + (1 - decay) * params`` leafwise, in the EMA's dtype."""
    return jax.tree.map(lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32))
                        .astype(e.dtype), ema, params)


def init(params):
    """A copy of ``params`` (distinct buffers: the train state is donated), same shardings; abstract
    (``ShapeDtypeStruct``) leaves stay as they are."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.copy(x), params)
