"""Machinery shared by the transformers whose blocks are stacked along a leading layer axis (Flux, FLUX.2, Qwen3):
creating ``n`` layers as one vmapped module, running them as one ``lax.scan`` under a remat policy, and checking the
per-sample inputs (timesteps, position ids, attention masks) of a joint text + image sequence.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_no_batch_saveable")


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs):
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return make(r)

    return create(rngs)


def remat_fn(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    policy = {"dots_saveable": jax.checkpoint_policies.dots_saveable,
              # saves the projections' matmul outputs but not the (batched) attention logits
              "dots_no_batch_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
    return jax.checkpoint(fn, prevent_cse=False, policy=policy)


def scan_blocks(blocks, body, carry, remat: str, last=None):
    """``carry = body(block_i, carry)`` for every layer of a stacked module, as one ``lax.scan``; with ``last``,
    the final layer runs ``last(block, carry)`` instead (outside the scan)."""
    if blocks is None:
        return carry
    graphdef, state = nnx.split(blocks)

    def step(c, layer_state):
        return body(nnx.merge(graphdef, layer_state), c), None

    if last is None:
        carry, _ = jax.lax.scan(remat_fn(step, remat), carry, state)
        return carry
    n = jax.tree.leaves(state)[0].shape[0]
    if n > 1:
        carry, _ = jax.lax.scan(remat_fn(step, remat), carry, jax.tree.map(lambda a: a[:-1], state))
    final = lambda c, layer_state: last(nnx.merge(graphdef, layer_state), c)  # noqa: E731
    return remat_fn(final, remat)(carry, jax.tree.map(lambda a: a[-1], state))


def as_batch(x, b: int, name: str):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
        x = jnp.full((b,), x)
    if x.shape != (b,):
        raise ValueError(f"{name} must be a scalar or [B={b}], got shape {x.shape}")
    return x


def joint_ids(txt_ids, img_ids, b, n_txt, n_img):
    txt_ids, img_ids = jnp.asarray(txt_ids), jnp.asarray(img_ids)
    for name, ids, n in (("txt_ids", txt_ids, n_txt), ("img_ids", img_ids, n_img)):
        if ids.ndim not in (2, 3) or ids.shape[-2] != n or (ids.ndim == 3 and ids.shape[0] != b):
            raise ValueError(f"{name} must be [{n}, n_axes] or [{b}, {n}, n_axes], got {ids.shape}")
    if txt_ids.ndim != img_ids.ndim:
        txt_ids = jnp.broadcast_to(txt_ids, (b, *txt_ids.shape[-2:]))
        img_ids = jnp.broadcast_to(img_ids, (b, *img_ids.shape[-2:]))
    for name, ids in (("txt_ids", txt_ids), ("img_ids", img_ids)):
        if ids.dtype not in (jnp.int32, jnp.int64, jnp.float32, jnp.float64):
            raise TypeError(f"{name} must be int32 or float32 (never bf16/fp16), got {ids.dtype}")
    if txt_ids.dtype != img_ids.dtype:
        txt_ids, img_ids = txt_ids.astype(jnp.float32), img_ids.astype(jnp.float32)
    return jnp.concatenate([txt_ids, img_ids], axis=-2)

def joint_mask(mask, b, n_txt, n_img):
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"attention_mask must be boolean (True = real token), got {mask.dtype}")
    if mask.shape == (b, n_img):
        mask = jnp.concatenate([jnp.ones((b, n_txt), bool), mask], axis=1)
    if mask.shape != (b, n_txt + n_img):
        raise ValueError(f"attention_mask must be [{b}, {n_txt + n_img}] or [{b}, {n_img}], got {mask.shape}")
    return mask
