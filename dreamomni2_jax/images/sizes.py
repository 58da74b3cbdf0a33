"""Image sizes: the Kontext preferred resolutions, target / reference / editing-pair sizes."""
from __future__ import annotations

import math

# Copied from diffusers/pipelines/flux/pipeline_flux_kontext.py (width, height).
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
]
KONTEXT_AREA = 1024 * 1024


# --------------------------------------------------------------------------- sizes


def _floor(v: float, multiple: int) -> int:
    return int(v) // multiple * multiple


def target_size(width: int, height: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """``(width, height)`` with area ~``max_area``, the input's aspect ratio, multiples of ``multiple``."""
    aspect = width / height
    w = round((max_area * aspect) ** 0.5)
    h = round((max_area / aspect) ** 0.5)
    w, h = _floor(w, multiple), _floor(h, multiple)
    if w < multiple or h < multiple:
        raise ValueError(f"image {width}x{height} gives an empty target size at max_area={max_area}")
    return w, h


def _snapped(width: int, height: int, max_area: int, multiple: int, scale_up: bool, what: str) -> tuple[int, int]:
    aspect = width / height
    _, w, h = min((abs(aspect - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    if max_area < KONTEXT_AREA or (scale_up and max_area > KONTEXT_AREA):
        s = math.sqrt(max_area / KONTEXT_AREA)
        w, h = w * s, h * s
    w, h = _floor(w, multiple), _floor(h, multiple)
    if w < multiple or h < multiple:
        raise ValueError(f"image {width}x{height} gives an empty {what} size at max_area={max_area}")
    return w, h


def reference_size(width: int, height: int, max_area: int = KONTEXT_AREA, multiple: int = 16) -> tuple[int, int]:
    """Closest-aspect Kontext preferred resolution (scaled for ``max_area < 1024**2``), floored to ``multiple``."""
    return _snapped(width, height, max_area, multiple, False, "reference")


def editing_size(width: int, height: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """One size for an editing pair (source = first reference, and target), from the source's ``width x height``.

    The source's closest-aspect Kontext preferred resolution (what DreamOmni2's ``resizeinput`` and the Kontext
    pipeline's ``_auto_resize`` give it; DreamOmni2 edits at that size) scaled by ``sqrt(max_area / 1024**2)``
    (up or down; exactly the Kontext entry at the 1024**2 budget), floored to ``multiple``."""
    return _snapped(width, height, max_area, multiple, True, "editing")


def pair_aspect_mismatch(source: tuple[int, int], target: tuple[int, int], tolerance: float) -> float | None:
    """Relative aspect-ratio difference ``max(a_t / a_s, a_s / a_t) - 1`` of an editing pair when above
    ``tolerance``, else None."""
    r = (target[0] / target[1]) / (source[0] / source[1])
    rel = max(r, 1.0 / r) - 1.0
    return rel if rel > tolerance else None
