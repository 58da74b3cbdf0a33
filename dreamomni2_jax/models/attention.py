"""Attention kernel dispatch for the Flux transformer.

``attention(q, k, v, mask, impl)`` takes ``[B, S, H, D]`` queries/keys/values (rope already applied) and an
optional boolean key mask ``[B, S]`` (True = real token) and returns ``[B, S, H, D]``.

Implementations:
  ``"xla"``    ``jax.nn.dot_product_attention(implementation="xla")``; softmax in float32.
  ``"cudnn"``  cuDNN flash attention (GPU only; bf16/fp16 inputs).
  ``"auto"``   ``implementation=None``: JAX picks (currently XLA).
  ``"splash"`` TPU Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``); padding is
               expressed as segment ids (real=1, pad=0) so real tokens never see padded ones. Sequence length
               must be a multiple of the splash block size (128). Only on TPU (``interpret=True`` for debugging).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn", "auto", "splash")


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


def attention(q, k, v, mask=None, impl: str = "xla"):
    """Scaled dot-product attention over ``[B, S, H, D]``; ``mask`` ``[B, S]`` bool masks keys."""
    check_impl(impl)
    if impl == "splash":
        return splash_attention(q, k, v, mask)
    implementation = None if impl == "auto" else impl
    bias_mask = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation=implementation)


@functools.lru_cache(maxsize=16)
def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.FullMask((seq_len, seq_len)) for _ in range(num_heads)])
    return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, mask=None, *, interpret: bool = False):
    """TPU splash attention hook (same contract as :func:`attention`)."""
    if not interpret and jax.default_backend() != "tpu":
        raise ValueError(f"attention_impl='splash' needs a TPU backend, running on {jax.default_backend()!r}")
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, s, h, d = q.shape
    kernel = _splash_kernel(h, s, interpret)
    scale = 1.0 / jnp.sqrt(jnp.asarray(d, jnp.float32))
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, S, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if mask is None:
        out = jax.vmap(lambda a, b_, c: kernel(a, b_, c))(qh, kh, vh)
    else:
        seg = mask.astype(jnp.int32)
        out = jax.vmap(lambda a, b_, c, sg: kernel(a, b_, c, segment_ids=sa.SegmentIds(q=sg, kv=sg)))(
            qh, kh, vh, seg
        )
    return out.transpose(0, 2, 1, 3)
