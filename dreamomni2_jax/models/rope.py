"""3D rotary position embedding used by Flux (pure functions).

Matches diffusers' ``FluxPosEmbed`` (``get_1d_rotary_pos_embed(..., use_real=True,
repeat_interleave_real=True)`` per axis, concatenated) and ``apply_rotary_emb(...,
use_real=True, use_real_unbind_dim=-1)``.

Ids are int32 or float32 ``[..., S, n_axes]`` and are never cast to bf16 (the official
pipelines do, which rounds positions above 256).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

FLUX_AXES_DIM = (16, 56, 56)
FLUX_THETA = 10000.0


def _turn_freqs(dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies in turns (cycles per position) split as ``hi + lo`` float32 parts.

    ``hi`` keeps 12 mantissa bits, so ``pos * hi`` is exact in float32 for integer positions
    below 4096; the angle is then reduced modulo one turn before ``cos``/``sin``. This gives
    float64-like accuracy (diffusers computes Flux rope in float64) without enabling x64.
    """
    if dim % 2:
        raise ValueError(f"rope axis dim must be even, got {dim}")
    turns = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim) / (2 * np.pi)
    mant, exp = np.frexp(turns)
    hi = np.ldexp(np.floor(mant * 2.0**12), exp - 12)
    return hi.astype(np.float32), (turns - hi).astype(np.float32)


def rope_cos_sin(
    ids, axes_dim: Sequence[int] = FLUX_AXES_DIM, theta: float = FLUX_THETA
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Return ``(cos, sin)``, float32 ``[..., S, sum(axes_dim)]``, for position ids ``[..., S, len(axes_dim)]``.

    Layout is diffusers' repeat-interleaved one: for each axis, ``[c0, c0, c1, c1, ...]``.
    """
    ids = jnp.asarray(ids)
    if ids.dtype not in (jnp.int32, jnp.int64, jnp.float32, jnp.float64):
        raise TypeError(f"position ids must be int32 or float32 (never bf16/fp16), got {ids.dtype}")
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids last axis is {ids.shape[-1]} but axes_dim has {len(axes_dim)} axes {tuple(axes_dim)}")
    pos = ids.astype(jnp.float32)
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        hi, lo = _turn_freqs(dim, theta)
        p = pos[..., axis, None]
        turns_hi = p * hi  # exact for integer positions < 4096
        turns = (turns_hi - jnp.floor(turns_hi)) + p * lo
        angles = jnp.repeat((2 * np.pi) * turns, 2, axis=-1)  # [..., S, dim]
        cos_parts.append(jnp.cos(angles))
        sin_parts.append(jnp.sin(angles))
    return jnp.concatenate(cos_parts, axis=-1), jnp.concatenate(sin_parts, axis=-1)


def apply_rope(x, cos, sin):
    """Rotate ``x`` ``[B, S, H, D]`` by ``cos``/``sin`` ``[S, D]`` or ``[B, S, D]``.

    Pairs are adjacent channels ``(2k, 2k+1)``; math in float32, result in ``x.dtype``.
    """
    if x.shape[-1] != cos.shape[-1]:
        raise ValueError(f"head dim {x.shape[-1]} != rope dim {cos.shape[-1]}")
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos = cos[..., None, :].astype(jnp.float32)  # broadcast over heads
    sin = sin[..., None, :].astype(jnp.float32)
    return (xf * cos + rotated * sin).astype(x.dtype)
