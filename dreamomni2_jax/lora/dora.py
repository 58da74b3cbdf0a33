"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) for :class:`dreamomni2_jax.lora.layers.LoRALinear`.

``lora.variant = "dora"`` adds a trainable magnitude vector ``m`` (one entry per output feature, the
``lora_magnitude_vector`` of peft) to every adapter. The math is peft's ``DoraLinearLayer`` (peft/tuners/lora/dora.py)
in our kernel layout (``kernel [..., in, out]``, torch's ``weight`` transposed):

* ``norm = || W + scale * A @ B ||`` over the input axis (peft: ``torch.linalg.norm(weight + scaling * lora_weight,
  dim=1)`` on ``weight [out, in]``), computed from the adapters with their gradient stopped and then stopped itself
  (DoRA paper, section 4.3: the norm is a constant for backpropagation);
* ``y = base(x) + (m / norm - 1) * (x @ W) + (m / norm) * scale * (x @ A @ B)``, where ``x`` is the dropped-out input
  when LoRA dropout is active (peft then recomputes ``x @ W`` from it) and ``base(x)`` keeps the bias;
* ``m`` starts as ``norm`` of the initial adapters (``B = 0``: the base weight's norm), so a fresh DoRA adapter, like
  a fresh LoRA, leaves the model unchanged.

The norm is computed in float32 (peft: in the input's dtype; identical for float32 models).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

VARIANTS = ("lora", "dora")
MAGNITUDE = "lora_magnitude_vector"  # peft's attribute / state-dict name

__all__ = ["VARIANTS", "MAGNITUDE", "weight_norm", "output"]


def weight_norm(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    """``||kernel + scale * A @ B||`` over the input axis: ``[..., in, out]`` -> ``[..., out]`` (float32)."""
    w = kernel.astype(jnp.float32) + jnp.float32(scale) * (lora_a.astype(jnp.float32) @ lora_b.astype(jnp.float32))
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=-2))


def output(y: jax.Array, x: jax.Array, *, kernel: jax.Array, bias: jax.Array | None, lora_a: jax.Array,
           lora_b: jax.Array, magnitude: jax.Array, scale: float, cdt, dropped: bool) -> jax.Array:
    """The DoRA layer output given the base layer's output ``y = x_in @ W + b`` and the adapter input ``x``
    (``dropped``: ``x`` is the dropped-out input, so ``x @ W`` is recomputed as peft does)."""
    norm = jax.lax.stop_gradient(weight_norm(kernel, jax.lax.stop_gradient(lora_a), jax.lax.stop_gradient(lora_b),
                                             scale))
    ratio = (magnitude.astype(jnp.float32) / norm).astype(cdt)  # peft's mag_norm_scale
    if dropped:
        base = x.astype(cdt) @ kernel.astype(cdt)
    else:
        base = y.astype(cdt) - (bias.astype(cdt) if bias is not None else 0)
    lora = (x.astype(cdt) @ lora_a.astype(cdt)) @ lora_b.astype(cdt)
    extra = (ratio - 1) * base + ratio * lora * jnp.asarray(scale, cdt)
    return y + extra.astype(y.dtype)
