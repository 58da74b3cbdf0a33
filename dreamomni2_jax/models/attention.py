"""Attention kernel dispatch for the Flux transformer.

``attention(q, k, v, mask, impl)`` takes ``[B, Sq, H, D]`` queries and ``[B, S, H, D]`` keys/values (rope already
applied; ``Sq <= S``: the target-only last block asks for fewer query rows) and an optional boolean key mask
``[B, S]`` (True = real token) and returns ``[B, Sq, H, D]``. Only keys are masked: a padded query row still
attends to the real keys (its output is garbage but finite, as with every implementation here).

Implementations:
  ``"xla"``     ``jax.nn.dot_product_attention(implementation="xla")``; softmax in float32.
  ``"cudnn"``   cuDNN flash attention (NVIDIA GPU; bf16/fp16 inputs). cuDNN takes padding only as per-sample
                lengths with the padding at the end, so the keys/values are reordered real-first (a stable gather;
                attention does not depend on the order of keys) and ``key_value_seq_lengths`` = real keys.
  ``"splash"``  TPU Pallas splash attention; padding as segment ids (queries 1, keys 1 = real / 0 = pad),
                sequences padded to the kernel block inside.
  ``"splash_interpret"`` the same kernel run by the Pallas interpreter on any backend (tests, debugging).
  ``"blocked"`` flash-style query blocks with a custom VJP that recomputes probabilities per block (no S x S
                tensor kept for the backward); math in float32. 2x faster than ``"xla"`` on CPU and half the memory.
  ``"auto"``    from the devices the program is compiled for (the mesh in context, else the default devices; never
                ``jax.default_backend()``, which is the host when compiling ahead of time for another target):
                ``"splash"`` on TPU, ``"cudnn"`` on NVIDIA GPUs, ``"xla"`` on other GPUs, ``"blocked"`` on CPU.

Pallas and cuDNN kernels cannot be partitioned by XLA, so under a mesh (``jax.sharding.use_abstract_mesh``, set by
the train step and the sampler) they run inside ``shard_map``: batch over ``data`` x ``fsdp`` (the axes that divide
it), heads over ``tensor`` (and over the batch axes the batch could not use, when the heads divide).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

ATTENTION_IMPLS = ("xla", "cudnn", "auto", "splash", "splash_interpret", "blocked")
KERNEL_IMPLS = ("cudnn", "splash", "splash_interpret")  # run per shard inside shard_map
BLOCK_Q = 128  # best of 32/64/128/256 on CPU at S ~ 2k
SPLASH_BLOCK = 512  # splash block for long sequences (128 below 1024 tokens); sequences are padded to it


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


def impl_for_device(platform: str, device_kind: str = "") -> str:
    """What ``"auto"`` means for a device (``device.platform``, ``device.device_kind``)."""
    platform = platform.lower()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda"):
        return "cudnn" if "nvidia" in device_kind.lower() or platform == "cuda" else "xla"
    if platform in ("rocm",):
        return "xla"
    return "blocked"


def _context_device():
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        dev = mesh.abstract_device
        if dev is not None:
            return dev.platform, dev.device_kind
    dev = jax.devices()[0]
    return dev.platform, dev.device_kind


def resolve_impl(impl: str, devices=None) -> str:
    """``impl`` with ``"auto"`` replaced by the choice for ``devices`` (a mesh's devices, or a list of devices;
    default: the mesh in context, else ``jax.devices()``)."""
    check_impl(impl)
    if impl != "auto":
        return impl
    if devices is None:
        return impl_for_device(*_context_device())
    dev = np.asarray(getattr(devices, "devices", devices), dtype=object).flat[0]
    return impl_for_device(dev.platform, dev.device_kind)


def attention(q, k, v, mask=None, impl: str = "xla"):
    """Scaled dot-product attention: ``q`` ``[B, Sq, H, D]``, ``k``/``v`` ``[B, S, H, D]``, ``mask`` ``[B, S]``."""
    impl = resolve_impl(impl)
    if impl == "splash" and _context_device()[0] != "tpu":
        raise ValueError(f"attention_impl='splash' needs a TPU target, the program targets "
                         f"{_context_device()[0]!r} (use 'splash_interpret' to run the kernel interpreted)")
    if impl in KERNEL_IMPLS:
        fn = cudnn_attention if impl == "cudnn" else functools.partial(
            splash_attention, interpret=impl == "splash_interpret")
        return sharded_kernel(fn, q, k, v, mask)
    if impl == "blocked":
        return blocked_attention(q, k, v, mask)
    bias_mask = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="xla")


# ----------------------------------------------------------------------------------- kernels under a mesh
def kernel_specs(mesh, batch: int, heads: int) -> tuple[P, P]:
    """``(qkv spec [B, S, H, D], mask spec [B, S])`` for running a kernel per shard on ``mesh``."""
    names = set(mesh.axis_names)
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    batch_axes: tuple = ()
    dcn = ("dcn_data",) if "dcn_data" in names else ()  # a multi-slice mesh (sharding.batch_axes)
    for cand in (dcn + ("data", "fsdp"), dcn + ("fsdp",), dcn + ("data",), dcn, ("data", "fsdp"), ("fsdp",),
                 ("data",)):
        if cand and set(cand) <= names and size(cand) > 1 and batch % size(cand) == 0:
            batch_axes = cand
            break
    head_axes: tuple = ()
    for cand in ("tensor", "fsdp", "data"):
        if cand in names and cand not in batch_axes and mesh.shape[cand] > 1 and heads % (size(head_axes)
                                                                                         * mesh.shape[cand]) == 0:
            head_axes += (cand,)
    b = batch_axes or None
    h = head_axes or None
    return P(b, None, h, None), P(b, None)


def sharded_kernel(fn, q, k, v, mask):
    """``fn(q, k, v, mask)`` per shard inside ``shard_map`` over the mesh in context (plain call without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, mask)
    spec, mspec = kernel_specs(mesh, q.shape[0], q.shape[2])
    if mask is None:
        return jax.shard_map(lambda a, b, c: fn(a, b, c, None), mesh=mesh, in_specs=(spec, spec, spec),
                             out_specs=spec, check_vma=False)(q, k, v)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, mspec), out_specs=spec,
                         check_vma=False)(q, k, v, mask)


def keys_real_first(k, v, mask):
    """Reorder keys/values so each sample's real keys come first (stable) -> ``(k, v, lengths int32 [B])``."""
    order = jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)  # noqa: E731
    return take(k), take(v), jnp.sum(mask, axis=1, dtype=jnp.int32)


def cudnn_attention(q, k, v, mask=None, *, implementation: str = "cudnn"):
    """cuDNN flash attention with the key mask as lengths (see :func:`keys_real_first`).

    ``implementation="xla"`` runs the same reordering and lengths through XLA (checks the layout on CPU)."""
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    k, v, lengths = keys_real_first(k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len)) for _ in range(num_heads)])
    with jax.ensure_compile_time_eval():  # its mask tables are constants, never tracers of the caller's trace
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, mask=None, *, interpret: bool = False):
    """Splash attention on one shard (same contract as :func:`attention`). Queries and keys are padded to the
    block size; padded keys get segment id 0 (masked), every query id 1 (it sees all real keys)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, sq, h, d = q.shape
    s = k.shape[1]
    block = SPLASH_BLOCK if min(sq, s) >= 2 * SPLASH_BLOCK else 128
    pq, pk = (-sq) % block, (-s) % block
    kv_seg = jnp.ones((b, s), jnp.int32) if mask is None else mask.astype(jnp.int32)
    scale = 1.0 / np.sqrt(d)
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, Sq, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if pq:
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, pq), (0, 0)))
    if pk:
        kh, vh = (jnp.pad(x, ((0, 0), (0, 0), (0, pk), (0, 0))) for x in (kh, vh))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pk)))
    q_seg = jnp.ones((b, sq + pq), jnp.int32)
    kernel = _splash_kernel(h, sq + pq, s + pk, block, interpret)
    out = jax.vmap(lambda a, b_, c, qs, ks: kernel(a, b_, c, segment_ids=sa.SegmentIds(q=qs, kv=ks)))(
        qh, kh, vh, q_seg, kv_seg)
    return out[:, :, :sq].transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------- blocked (CPU) attention
def _qblocks(x, bq):  # [B, H, S, D] -> [nb, B, H, bq, D]
    b, h, s, d = x.shape
    return x.reshape(b, h, s // bq, bq, d).transpose(2, 0, 1, 3, 4)


def _unblock(x):  # [nb, B, H, bq, D] -> [B, H, S, D]
    nb, b, h, bq, d = x.shape
    return x.transpose(1, 2, 0, 3, 4).reshape(b, h, nb * bq, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, bias, bq):  # q, k, v [B, H, S, D] float32; bias [B, 1, 1, S] (0 / -1e30)
    return _blocked_fwd(q, k, v, bias, bq)[0]


def _blocked_fwd(q, k, v, bias, bq):
    scale = 1.0 / np.sqrt(q.shape[-1])

    def one(qb):
        s = jnp.einsum("bhqd,bhkd->bhqk", qb * scale, k) + bias
        m = jnp.max(s, -1, keepdims=True)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, -1, keepdims=True)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v) / denom, (m + jnp.log(denom))[..., 0]

    o, lse = jax.lax.map(one, _qblocks(q, bq))
    out = _unblock(o)
    return out, (q, k, v, bias, out, lse)


def _blocked_bwd(bq, res, do):
    q, k, v, bias, out, lse = res
    scale = 1.0 / np.sqrt(q.shape[-1])
    delta = jnp.sum(do * out, -1, keepdims=True)  # [B, H, S, 1]

    def body(carry, xs):
        dk, dv = carry
        qb, dob, lseb, deltab = xs
        s = jnp.einsum("bhqd,bhkd->bhqk", qb * scale, k) + bias
        p = jnp.exp(s - lseb[..., None])
        dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, dob)
        ds = p * (jnp.einsum("bhqd,bhkd->bhqk", dob, v) - deltab)
        dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qb) * scale
        return (dk, dv), jnp.einsum("bhqk,bhkd->bhqd", ds, k) * scale

    zeros = jnp.zeros(k.shape, k.dtype)
    (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), (_qblocks(q, bq), _qblocks(do, bq), lse, _qblocks(delta, bq)))
    return _unblock(dq), dk, dv, jnp.zeros_like(bias)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q, k, v, mask=None, block_q: int = BLOCK_Q):
    """Same contract as :func:`attention`: ``[B, S, H, D]`` in, ``[B, S, H, D]`` out in ``q.dtype``.

    Heads-major inside (one transpose outside the block loop); queries padded to a multiple of ``block_q``.
    Fully masked rows get a uniform average (garbage at padded positions, as with the XLA impl).
    """
    b, s = q.shape[:2]
    bq = min(block_q, s)
    pad = (-s) % bq
    bias = (jnp.zeros((b, 1, 1, k.shape[1]), jnp.float32) if mask is None
            else jnp.where(mask, 0.0, -1e30).astype(jnp.float32)[:, None, None, :])
    qh, kh, vh = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q, k, v))
    if pad:
        qh = jnp.pad(qh, ((0, 0), (0, 0), (0, pad), (0, 0)))
    out = _blocked(qh, kh, vh, bias, bq)[:, :, :s]
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
