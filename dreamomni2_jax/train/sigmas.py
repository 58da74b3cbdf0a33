"""Training noise levels σ and their loss weightings (pure JAX).

σ ∈ (0, 1) is the noise level of ``x_t = (1 - σ) x0 + σ ε`` (FlowMatchEulerDiscreteScheduler sigmas); the Flux
transformer takes ``timestep = σ`` (it multiplies by 1000 inside, like diffusers).

Samplers (one σ per PRNG key, so every sample's draw depends only on its own key):

* ``uniform``: ``u ~ U(0, 1)``;
* ``logit_normal``: ``sigmoid(N(mean, std))`` (SD3 / diffusers ``compute_density_for_timestep_sampling``);
* ``mode``: ``1 - u - s (cos²(πu/2) - 1 + u)`` (same diffusers function, ``mode_scale`` = s);
* ``sigmoid_shift``: logit-normal then Flux's resolution-dependent shift: ``mu = calculate_shift(seq_len)``
  (linear from ``base_shift`` 0.5 at 256 tokens to ``max_shift`` 1.15 at 4096), ``σ = e^mu / (e^mu + 1/t - 1)``
  (diffusers ``FlowMatchEulerDiscreteScheduler`` exponential ``time_shift`` with sigma 1). ``seq_len`` is the
  sample's real target token count.

Weightings are diffusers' ``compute_loss_weighting_for_sd3``: ``none`` (1), ``sigma_sqrt`` (σ⁻²), ``cosmap``
(``2 / (π (1 - 2σ + 2σ²))``). diffusers' trainers look σ up in the scheduler's 1000 discrete training sigmas, the
smallest being ``1 / num_train_timesteps`` = 1e-3; our σ is continuous, so ``sigma_sqrt`` clamps σ at
:data:`SIGMA_MIN` = 1e-3 (weight ≤ 1e6) instead of growing without bound near 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dreamomni2_jax.sample.schedule import calculate_shift, time_shift  # Flux's dynamic shift, shared with sampling

SAMPLERS = ("uniform", "logit_normal", "mode", "sigmoid_shift")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
SIGMA_MIN = 1e-3  # smallest training sigma of diffusers' FlowMatchEulerDiscreteScheduler (1 / 1000 timesteps)


def sample_sigmas(keys: jax.Array, sampling: str, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29, seq_len=None) -> jax.Array:
    """One float32 σ per key (``keys`` ``[B]``); ``seq_len`` ``[B]`` is needed by ``sigmoid_shift``."""
    if sampling not in SAMPLERS:
        raise ValueError(f"timestep sampling {sampling!r} is not one of {SAMPLERS}")
    if sampling in ("logit_normal", "sigmoid_shift"):
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(keys))
    else:
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    if sampling == "mode":
        u = 1.0 - u - mode_scale * (jnp.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    elif sampling == "sigmoid_shift":
        if seq_len is None:
            raise ValueError("sigmoid_shift sampling needs seq_len (target tokens per sample)")
        u = time_shift(calculate_shift(jnp.asarray(seq_len, jnp.float32)), u)
    return u


def loss_weighting(sigmas: jax.Array, weighting: str) -> jax.Array:
    """Per-sample loss weight for ``sigmas`` (diffusers ``compute_loss_weighting_for_sd3``)."""
    if weighting == "sigma_sqrt":
        return jnp.maximum(sigmas, SIGMA_MIN) ** -2.0
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas ** 2))
    if weighting == "none":
        return jnp.ones_like(sigmas)
    raise ValueError(f"loss weighting {weighting!r} is not one of {WEIGHTINGS}")
