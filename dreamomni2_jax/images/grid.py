"""Validation grids: rows of images with a caption line, as one uint8 array."""
from __future__ import annotations

import numpy as np
from PIL import Image

ROW_HEIGHT = 256


def _fit_height(img: np.ndarray, height: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` scaled to ``height`` rows keeping the aspect ratio."""
    h, w = img.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))


CAPTION_HEIGHT = 16  # pixels of the prompt line above each grid row


def _caption(text: str, width: int) -> np.ndarray:
    """uint8 ``[CAPTION_HEIGHT, width, 3]``: ``text`` in black on white (PIL's default font), cut with "..." to fit."""
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (width, CAPTION_HEIGHT), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    line = " ".join(text.split())
    while line and draw.textlength(line, font=font) > width - 4:
        line = line[:-4] + "..." if len(line) > 4 else ""
    draw.text((2, 2), line, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def make_grid(rows: list[list[np.ndarray]], row_height: int = ROW_HEIGHT, pad: int = 4,
              captions: list[str] | None = None) -> np.ndarray:
    """uint8 grid: one row per list of uint8 ``[H, W, 3]`` images (scaled to ``row_height``), white padding;
    ``captions`` (one per row, e.g. the prompt) are written on a :data:`CAPTION_HEIGHT` line above each row."""
    if not rows or not all(rows):
        raise ValueError("make_grid needs at least one non-empty row")
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"make_grid: {len(captions)} captions for {len(rows)} rows")
    cap = CAPTION_HEIGHT if captions is not None else 0
    scaled = [[_fit_height(im, row_height) for im in row] for row in rows]
    widths = [sum(im.shape[1] for im in row) + pad * (len(row) + 1) for row in scaled]
    grid = np.full((len(rows) * (cap + row_height + pad) + pad, max(widths), 3), 255, np.uint8)
    y = pad
    for r, row in enumerate(scaled):
        if cap:
            grid[y:y + cap] = _caption(captions[r], max(widths))
            y += cap
        x = pad
        for im in row:
            grid[y:y + row_height, x:x + im.shape[1]] = im
            x += im.shape[1] + pad
        y += row_height + pad
    return grid
