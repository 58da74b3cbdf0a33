"""Integrity of training state: a per-leaf digest stored with each checkpoint, and finiteness checks.

``tree_digest(tree)`` gives every array leaf a 32-bit weighted sum of its raw bits (``sum_i bits_i * (2 i + 1)``
mod 2**32, computed on device). Integer addition is associative, so the value is the same on every mesh and
number of processes (a checkpoint saved on 8 devices verifies on 1), and any single flipped bit changes it (the
weights are odd). It is a guard against storage faults, not a cryptographic hash.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreamomni2_jax.utils.tree_paths import dotted, path_parts

ALGORITHM = "wsum32-v1"
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


key_of = dotted  # dotted key of a pytree path (same for saved / restored states)


def _bits_u32(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.bool_):
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:  # two 32-bit words per element
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, _UINT[size]).astype(jnp.uint32).reshape(-1)


@jax.jit
def _digests(leaves: list[jax.Array]) -> list[jax.Array]:
    out = []
    for x in leaves:
        bits = _bits_u32(jnp.asarray(x))
        weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        out.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return out


def tree_digest(tree: Any) -> dict[str, int]:
    """``{leaf key: 32-bit digest}`` of every array leaf of ``tree`` (device or host arrays)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    keys = [key_of(p) for p, _ in flat]
    values = jax.device_get(_digests([v for _, v in flat])) if flat else []
    return {k: int(np.asarray(v)) for k, v in zip(keys, values)}


def digest_record(tree: Any) -> dict:
    return {"algorithm": ALGORITHM, "leaves": tree_digest(tree)}


def digest_mismatches(record: dict, tree: Any) -> list[str]:
    """Leaves of ``tree`` whose digest differs from ``record`` (a :func:`digest_record`); [] when intact."""
    if record.get("algorithm") != ALGORITHM:
        return [f"unknown digest algorithm {record.get('algorithm')!r}"]
    want, have = record.get("leaves") or {}, tree_digest(tree)
    bad = [k for k in sorted(want) if k in have and have[k] != want[k]]
    missing = sorted(set(want) ^ set(have))
    return bad + [f"{k} (not in both)" for k in missing]


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
    oks = [jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(oks).all() if oks else jnp.bool_(True)


def tree_finite(tree: Any) -> bool:
    """True when every float leaf of ``tree`` is finite (no NaN / inf)."""
    return bool(_finite(jax.tree.leaves(tree)))


def nonfinite_leaves(flat: dict[str, Any]) -> list[str]:
    """Keys of a flat ``{key: array}`` whose values are not all finite (host check, for LoRA files)."""
    return sorted(k for k, v in flat.items() if not np.isfinite(np.asarray(v, dtype=np.float32)).all())


__all__ = ["ALGORITHM", "tree_digest", "digest_record", "digest_mismatches", "tree_finite", "nonfinite_leaves",
           "key_of", "path_parts"]
