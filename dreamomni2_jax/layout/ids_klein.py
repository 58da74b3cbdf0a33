"""FLUX.2 position ids: 4 axes ``(T, H, W, L)`` (pure numpy, host side).

Reproduces ``Flux2KleinPipeline`` (and ``Flux2Pipeline``) exactly:

* target (noisy) image, ``_prepare_latent_ids``: ``[0, row, col, 0]``;
* reference image ``i`` (0-based), ``_prepare_image_ids``: ``[10 + 10 * i, row, col, 0]`` — references are told
  apart by the time axis only, rows/cols restart at 0 for every reference;
* text token ``l``, ``_prepare_text_ids``: ``[0, 0, 0, l]``.

Sizes are VAE-latent sizes (pixels / 8) and tokens are 2x2 latent patches in row-major order, as in
:mod:`dreamomni2_jax.layout.patches` (whose ``pack_latents`` / ``unpack_latents`` give the FLUX.2 patchify + pack token
and feature order too). Model input per sample is ``[target tokens | reference tokens]``; batches of samples of
different sizes are padded per section by :func:`dreamomni2_jax.layout.ids_flux1.batch_layout` (``scheme="flux2"``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dreamomni2_jax.layout.patches import LatentSize, check_latent_size

N_AXES = 4
REFERENCE_T_SCALE = 10  # diffusers ``_prepare_image_ids(scale=10)``: reference i at T = scale + scale * i


def _grid_ids(t: int, latent_h: int, latent_w: int) -> np.ndarray:
    check_latent_size(latent_h, latent_w)
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


def sample_ids(layout) -> np.ndarray:
    """``[target_tokens + reference_tokens, 4]``: target ids then reference ids of a
    :class:`dreamomni2_jax.layout.ids_flux1.SampleLayout`."""
    return np.concatenate([target_ids(*layout.target), reference_ids(layout.references)], axis=0)
