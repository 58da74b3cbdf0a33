"""FLUX.2 position ids: 4 axes ``(T, H, W, L)`` (pure numpy, host side).

Reproduces ``Flux2KleinPipeline`` (and ``Flux2Pipeline``) exactly:

* target (noisy) image, ``_prepare_latent_ids``: ``[0, row, col, 0]``;
* reference image ``i`` (0-based), ``_prepare_image_ids``: ``[10 + 10 * i, row, col, 0]`` — references are told
  apart by the time axis only, rows/cols restart at 0 for every reference;
* text token ``l``, ``_prepare_text_ids``: ``[0, 0, 0, l]``.

Sizes are VAE-latent sizes (pixels / 8) and tokens are 2x2 latent patches in row-major order, as in
:mod:`dreamomni2_jax.positions` (whose ``pack_latents`` / ``unpack_latents`` give the FLUX.2 patchify + pack token
and feature order too). Model input per sample is ``[target tokens | reference tokens]``; batches of samples of
different sizes are padded per section like :func:`dreamomni2_jax.positions.batch_layout`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dreamomni2_jax.positions import BatchLayout, LatentSize, SampleLayout, _check_size

N_AXES = 4
REFERENCE_T_SCALE = 10  # diffusers ``_prepare_image_ids(scale=10)``: reference i at T = scale + scale * i


def _grid_ids(t: int, latent_h: int, latent_w: int) -> np.ndarray:
    _check_size(latent_h, latent_w)
    rows, cols = np.meshgrid(np.arange(latent_h // 2), np.arange(latent_w // 2), indexing="ij")
    ids = np.stack([np.full_like(rows, t), rows, cols, np.zeros_like(rows)], axis=-1)
    return ids.reshape(-1, N_AXES).astype(np.int32)


def target_ids(latent_h: int, latent_w: int) -> np.ndarray:
    """int32 ``[(h//2)*(w//2), 4]``, rows ``[0, row, col, 0]`` in row-major order."""
    return _grid_ids(0, latent_h, latent_w)


def reference_ids(latent_sizes: Sequence[LatentSize], scale: int = REFERENCE_T_SCALE) -> np.ndarray:
    """All reference tokens' ids, concatenated in order; reference ``i`` gets ``T = scale + scale * i``."""
    parts = [_grid_ids(scale + scale * i, int(h), int(w)) for i, (h, w) in enumerate(latent_sizes)]
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, N_AXES), np.int32)


def text_ids(n: int) -> np.ndarray:
    """int32 ``[n, 4]``, rows ``[0, 0, 0, l]``."""
    ids = np.zeros((n, N_AXES), np.int32)
    ids[:, 3] = np.arange(n)
    return ids


def sample_ids(layout: SampleLayout) -> np.ndarray:
    """``[target_tokens + reference_tokens, 4]``: target ids then reference ids."""
    return np.concatenate([target_ids(*layout.target), reference_ids(layout.references)], axis=0)


def batch_layout(samples: Sequence[SampleLayout], target_len: int | None = None,
                 reference_len: int | None = None) -> BatchLayout:
    """Per-sample 4-axis ids padded to a common length plus the boolean token mask (same layout and padding rules
    as :func:`dreamomni2_jax.positions.batch_layout`; padded rows are id 0, mask False)."""
    if not samples:
        raise ValueError("batch_layout needs at least one sample")
    t_max = max(s.target_tokens for s in samples)
    r_max = max(s.reference_tokens for s in samples)
    target_len = t_max if target_len is None else target_len
    reference_len = r_max if reference_len is None else reference_len
    if t_max > target_len or r_max > reference_len:
        raise ValueError(
            f"batch needs target_len >= {t_max} and reference_len >= {r_max}, got {target_len}, {reference_len}")
    n = target_len + reference_len
    ids = np.zeros((len(samples), n, N_AXES), np.int32)
    mask = np.zeros((len(samples), n), bool)
    for b, s in enumerate(samples):
        ids[b, : s.target_tokens] = target_ids(*s.target)
        mask[b, : s.target_tokens] = True
        ref = reference_ids(s.references)
        ids[b, target_len: target_len + len(ref)] = ref
        mask[b, target_len: target_len + len(ref)] = True
    return BatchLayout(ids=ids, mask=mask, target_len=target_len, reference_len=reference_len)
