"""Image files: open and decode to 8-bit RGB (EXIF orientation, 16-bit grayscale), resize to pixels in [-1, 1]; :class:`BadInput`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class BadInput(ValueError):
    """A training input is unusable; ``where`` names the manifest line / folder entry, ``path`` the file."""

    def __init__(self, where: str, reason: str, path: str | None = None):
        self.where, self.reason, self.path = where, reason, path
        super().__init__(f"{where}: {reason}" + (f" ({path})" if path else ""))


# --------------------------------------------------------------------------- images


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB the way ``diffusers.utils.load_image`` does it (EXIF orientation applied, then RGB), except that
    16-bit grayscale (``I;16*``, and ``I`` holding 16-bit values) is scaled to 8 bits instead of saturating."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img) or img
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        if img.mode in _SIXTEEN_BIT or a.max(initial=0) > 255:
            a = a / 257.0  # 65535 -> 255, and 257 * v -> v exactly
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def open_image(path: str, where: str, min_size: int = 0) -> Image.Image:
    """Fully decoded RGB image (:func:`to_rgb`); :class:`BadInput` if missing, unreadable, corrupt or smaller than
    ``min_size``."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(where, "image file not found", path)
    try:
        with Image.open(p) as img:
            img.load()
            rgb = to_rgb(img)
    except Exception as e:  # PIL raises many types for corrupt/truncated data
        raise BadInput(where, f"cannot read image ({type(e).__name__}: {e})", path) from None
    if min(rgb.size) < min_size:
        raise BadInput(where, f"image {rgb.size[0]}x{rgb.size[1]} is below data.min_image_size={min_size}", path)
    return rgb


def image_size(path: str, where: str) -> tuple[int, int]:
    """``(width, height)`` from the header only (cheap pre-check); :class:`BadInput` when unreadable."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(where, "image file not found", path)
    try:
        with Image.open(p) as img:
            return img.size
    except Exception as e:
        raise BadInput(where, f"cannot read image ({type(e).__name__}: {e})", path) from None


def to_pixels(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Lanczos resize to ``size`` = (width, height) -> float32 ``[H, W, 3]`` in [-1, 1] (VaeImageProcessor)."""
    if img.size != tuple(size):
        img = img.resize(tuple(size), resample=Image.Resampling.LANCZOS)
    x = np.asarray(img, dtype=np.float32) / 255.0
    return 2.0 * x - 1.0
