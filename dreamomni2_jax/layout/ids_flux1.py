"""Token layout and position ids for Kontext / DreamOmni2 inputs (pure numpy, host side).

Sizes are VAE-latent sizes (pixels / 8). Tokens are 2x2 latent patches, so a latent of
``(h, w)`` gives ``(h // 2) * (w // 2)`` tokens in row-major order.

Ids are ``[domain, row, col]``:

* target (noisy) image: domain 0, ``[0, row, col]``;
* reference image ``i`` (0-based): domain ``i + 1``, ``[i + 1, row, col + w_offset_i]``;
* text tokens: all zeros.

``w_offset_i`` comes from the scheme. ``"dreamomni2"``: cumulative token width of the
previous references (the official pipeline also accumulates an ``h_offset`` but never
applies it; neither do we). ``"kontext"``: no offset. With one reference both equal
diffusers' ``FluxKontextPipeline`` image ids exactly. The built-in schemes are the read-only
:data:`SCHEMES`; a caller with its own scheme passes its ``column_offsets`` function wherever a scheme name goes.

Model input per sample is ``[target tokens | reference tokens]``. Batches of samples with
different sizes are padded per section (see :func:`batch_layout`) so the target part is
always ``tokens[:, :target_len]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np

from dreamomni2_jax.layout import ids_klein as positions_flux2
from dreamomni2_jax.layout.patches import (  # noqa: F401 - num_tokens / pack_latents / unpack_latents: public here too
    LatentSize, check_latent_size, num_tokens, pack_latents, unpack_latents)

SchemeFn = Callable[[Sequence[LatentSize]], list[int]]

IDS_DTYPES = ("int32", "bfloat16")


def round_ids(ids, ids_dtype: str = "int32"):
    """Ids as the transformer sees them. ``int32``: exact (default). ``bfloat16``: rounded through bfloat16 and
    returned as float32, as the diffusers / DreamOmni2 pipelines do when they cast their ids to the bf16 model dtype
    (integers above 256 lose their low bits: 257 -> 256, 261 -> 260); only for bit-level parity with them."""
    if ids_dtype == "int32":
        return ids
    if ids_dtype == "bfloat16":
        import jax.numpy as jnp

        return jnp.asarray(ids).astype(jnp.bfloat16).astype(jnp.float32)
    raise ValueError(f"ids dtype {ids_dtype!r} is not one of {IDS_DTYPES}")


def _dreamomni2_offsets(latent_sizes: Sequence[LatentSize]) -> list[int]:
    offsets, w_offset = [], 0
    for _, w in latent_sizes:
        offsets.append(w_offset)
        w_offset += w // 2
    return offsets


# name -> ``column_offsets(latent_sizes) -> [w_offset_i]`` per reference (read-only: no process-wide registry)
SCHEMES: Mapping[str, SchemeFn] = MappingProxyType({
    "dreamomni2": _dreamomni2_offsets,
    "kontext": lambda latent_sizes: [0] * len(latent_sizes),
})


# FLUX.2's 4-axis ids ``(T, H, W, L)`` (:mod:`dreamomni2_jax.layout.ids_klein`): a scheme name wherever the 3-axis
# ones go (:meth:`SampleLayout.ids`, :func:`batch_layout`); not a ``column_offsets`` function.
FLUX2 = "flux2"


def schemes() -> tuple[str, ...]:
    return tuple(SCHEMES) + (FLUX2,)


def column_offsets(scheme: str | SchemeFn) -> SchemeFn:
    """The offsets function of a built-in scheme name, or ``scheme`` itself when the caller passes its own."""
    if callable(scheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown position scheme {scheme!r}; known: {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def _grid_ids(domain: int, latent_h: int, latent_w: int, col_offset: int = 0) -> np.ndarray:
    check_latent_size(latent_h, latent_w)
    rows, cols = np.meshgrid(np.arange(latent_h // 2), np.arange(latent_w // 2), indexing="ij")
    ids = np.stack([np.full_like(rows, domain), rows, cols + col_offset], axis=-1)
    return ids.reshape(-1, 3).astype(np.int32)


def target_ids(latent_h: int, latent_w: int) -> np.ndarray:
    """int32 ``[(h//2)*(w//2), 3]`` with rows ``[0, row, col]`` in row-major order."""
    return _grid_ids(0, latent_h, latent_w)


def reference_ids(latent_sizes: Sequence[LatentSize], scheme: str | SchemeFn = "dreamomni2") -> np.ndarray:
    """All reference tokens' ids, concatenated in order; image ``i`` gets domain ``i + 1``; ``scheme``: a name in
    :data:`SCHEMES` or a ``column_offsets`` function."""
    offsets_fn = column_offsets(scheme)
    sizes = [tuple(int(v) for v in s) for s in latent_sizes]
    if not sizes:
        return np.zeros((0, 3), np.int32)
    offsets = offsets_fn(sizes)
    parts = [_grid_ids(i + 1, h, w, off) for i, ((h, w), off) in enumerate(zip(sizes, offsets))]
    return np.concatenate(parts, axis=0)


def text_ids(n: int) -> np.ndarray:
    """Zeros ``[n, 3]`` (int32)."""
    return np.zeros((n, 3), np.int32)


def _ids_parts(sample: SampleLayout, scheme: str | SchemeFn) -> tuple[np.ndarray, np.ndarray]:
    """(target ids, reference ids) of one sample: FLUX.2's 4 axes for ``"flux2"``, else 3 axes of ``scheme``."""
    if scheme == FLUX2:
        return positions_flux2.target_ids(*sample.target), positions_flux2.reference_ids(sample.references)
    return target_ids(*sample.target), reference_ids(sample.references, scheme)


@dataclass(frozen=True)
class SampleLayout:
    """Latent sizes of one sample: the target and its ordered references."""

    target: LatentSize
    references: tuple[LatentSize, ...] = ()

    @property
    def target_tokens(self) -> int:
        return num_tokens(*self.target)

    @property
    def reference_tokens(self) -> int:
        return sum(num_tokens(h, w) for h, w in self.references)

    def ids(self, scheme: str | SchemeFn = "dreamomni2") -> np.ndarray:
        """``[target_tokens + reference_tokens, 3]``: target ids then reference ids (4 axes for ``"flux2"``)."""
        return np.concatenate(_ids_parts(self, scheme), axis=0)


@dataclass(frozen=True)
class BatchLayout:
    """Padded image-token layout of a batch: ``[target (target_len) | references (reference_len)]``."""

    ids: np.ndarray  # int32 [B, target_len + reference_len, 3]
    mask: np.ndarray  # bool [B, target_len + reference_len], True on real tokens
    target_len: int
    reference_len: int

    @property
    def target_mask(self) -> np.ndarray:
        return self.mask[:, : self.target_len]


def batch_layout(
    samples: Sequence[SampleLayout],
    scheme: str | SchemeFn = "dreamomni2",
    target_len: int | None = None,
    reference_len: int | None = None,
) -> BatchLayout:
    """Per-sample ids padded to a common length, plus the boolean token mask.

    Each sample's target tokens fill ``[0, target_len)`` and its reference tokens
    ``[target_len, target_len + reference_len)``; the rest is padding (id 0, mask False).
    ``target_len``/``reference_len`` default to the batch maxima (pass fixed values for
    static shapes under jit).
    """
    if not samples:
        raise ValueError("batch_layout needs at least one sample")
    t_max = max(s.target_tokens for s in samples)
    r_max = max(s.reference_tokens for s in samples)
    target_len = t_max if target_len is None else target_len
    reference_len = r_max if reference_len is None else reference_len
    if t_max > target_len or r_max > reference_len:
        raise ValueError(
            f"batch needs target_len >= {t_max} and reference_len >= {r_max}, got {target_len}, {reference_len}"
        )
    n = target_len + reference_len
    ids = np.zeros((len(samples), n, positions_flux2.N_AXES if scheme == FLUX2 else 3), np.int32)
    mask = np.zeros((len(samples), n), bool)
    for b, s in enumerate(samples):
        target, ref = _ids_parts(s, scheme)
        ids[b, : s.target_tokens] = target
        mask[b, : s.target_tokens] = True
        ids[b, target_len : target_len + len(ref)] = ref
        mask[b, target_len : target_len + len(ref)] = True
    return BatchLayout(ids=ids, mask=mask, target_len=target_len, reference_len=reference_len)
