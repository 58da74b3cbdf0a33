"""Sampling references: an image (path, PIL image, ``[H, W, 3]`` uint8 or float array in [0, 1]) -> float32
pixels ``[H, W, 3]`` in [-1, 1] at its sampling size, per model family.

* :func:`reference_pixels` (FLUX.1 Kontext / DreamOmni2): snapped to the closest Kontext preferred resolution
  (``auto_resize``) or only floored to multiples of 16, lanczos-resized;
* :func:`klein_reference_pixels` (FLUX.2 [klein]): ``Flux2KleinPipeline``'s own preprocessing.

The family picks one (:meth:`dreamomni2_jax.families.Flux1Family.reference_pixels`); the sampler calls the family.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreamomni2_jax.images.sizes import KONTEXT_AREA, reference_size
from dreamomni2_jax.images.io import open_image, to_pixels, to_rgb

MULTIPLE = 16  # 2 x VAE downscale: latents must be even for 2x2 packing
ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray


def floor16(w: int, h: int, what: str) -> tuple[int, int]:
    w, h = w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE
    if w < MULTIPLE or h < MULTIPLE:
        raise ValueError(f"{what}: size {w}x{h} after flooring to multiples of {MULTIPLE} is empty")
    return w, h


def _resize_float(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos resize of a float ``[H, W, C]`` array per channel (PIL mode F, no 8-bit rounding)."""
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), mode="F").resize(
        size, resample=Image.Resampling.LANCZOS)) for c in range(x.shape[-1])]
    return np.stack(chans, axis=-1)


def reference_pixels(image: ImageLike, auto_resize: bool = True, where: str = "reference",
                     area: int = KONTEXT_AREA) -> np.ndarray:
    """One reference as float32 ``[H, W, 3]`` in [-1, 1] at its sampling size (see :mod:`dreamomni2_jax.sample.pipeline`).

    ``area`` < 1024² scales the snapped Kontext resolution down (as the cache stage does for small budgets).

    Raises :class:`dreamomni2_jax.images.io.BadInput` (a ``ValueError``) naming ``where`` and the file for a missing
    or unreadable file, and ``ValueError`` for arrays of the wrong shape / range."""
    if isinstance(image, (str, Path)):
        image = open_image(str(image), where)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{where}: expected an RGB array [H, W, 3], got shape {image.shape}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        image = to_rgb(image)
        w, h = image.size
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{where}: expected an RGB array [H, W, 3], got shape {image.shape}")
        image = image.astype(np.float32)
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"{where}: float images must be in [0, 1], got range "
                             f"[{np.nanmin(image):.3g}, {np.nanmax(image):.3g}]")
        h, w = image.shape[:2]
    else:
        raise TypeError(f"{where}: expected a path, PIL image or numpy array, got {type(image).__name__}")
    size = reference_size(w, h, area, MULTIPLE) if auto_resize else floor16(w, h, where)
    if isinstance(image, Image.Image):
        return to_pixels(image, size)
    if (w, h) != size:
        image = _resize_float(image, size)
    return image * 2.0 - 1.0


KLEIN_REFERENCE_AREA = 1024 * 1024  # Flux2KleinPipeline: larger references are scaled down to this area


def klein_reference_pixels(image: ImageLike, where: str = "reference") -> np.ndarray:
    """One reference as ``Flux2KleinPipeline`` prepares it: above 1024² pixels lanczos-resized to that area
    (``Flux2ImageProcessor._resize_to_target_area``), then centre-cropped to multiples of 16; float32 ``[H, W, 3]``
    in [-1, 1]. Float arrays in [0, 1] are cropped (and resized per channel in float when too large). The pipeline's
    input checks (sides >= 64 px, aspect <= 8:1) are not applied: smaller references work here."""
    if isinstance(image, (str, Path)):
        image = open_image(str(image), where)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        image = to_rgb(image)
        w, h = image.size
        if w * h > KLEIN_REFERENCE_AREA:
            scale = (KLEIN_REFERENCE_AREA / (w * h)) ** 0.5
            image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
        x = np.asarray(image, np.float32) / 255.0
    elif isinstance(image, np.ndarray):
        x = image.astype(np.float32)
        if x.ndim != 3 or x.shape[-1] != 3 or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"{where}: expected an RGB float array [H, W, 3] in [0, 1], got shape {x.shape}")
        h, w = x.shape[:2]
        if w * h > KLEIN_REFERENCE_AREA:
            scale = (KLEIN_REFERENCE_AREA / (w * h)) ** 0.5
            x = _resize_float(x, (int(w * scale), int(h * scale)))
    else:
        raise TypeError(f"{where}: expected a path, PIL image or numpy array, got {type(image).__name__}")
    h, w = x.shape[:2]
    cw, ch = floor16(w, h, where)
    left, top = (w - cw) // 2, (h - ch) // 2
    return x[top:top + ch, left:left + cw] * 2.0 - 1.0


__all__ = ["MULTIPLE", "ImageLike", "floor16", "reference_pixels", "klein_reference_pixels", "KLEIN_REFERENCE_AREA"]
