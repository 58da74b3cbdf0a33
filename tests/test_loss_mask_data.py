"""Masked loss from the data side: a manifest's / qflux folder's mask images cached at latent resolution and
streamed as per-token weights; refused when the cache has no masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from support.fixtures_data import draw_image
from dreamomni2_jax.data import stream as data
from dreamomni2_jax.cache import inputs
from dreamomni2_jax.cache.stage import build_cache
from test_training_inputs import PoolEncoders, _config, _records


def _mask(path: Path, size, box) -> Path:
    img = Image.new("L", size, 0)
    ImageDraw.Draw(img).rectangle(box, fill=255)
    img.save(path)
    return path


def _manifest(root: Path, with_mask: bool) -> Path:
    (root / "img").mkdir(parents=True)
    lines = []
    for i, size in enumerate([(320, 240), (256, 256)]):
        draw_image(root / "img" / f"t{i}.png", size, 10 * i)
        draw_image(root / "img" / f"s{i}.png", size, 10 * i + 1)
        line = {"instruction": f"edit {i}", "target": f"img/t{i}.png", "references": [f"img/s{i}.png"]}
        if with_mask and i == 0:
            _mask(root / "img" / "m0.png", size, (40, 30, 200, 150))
            line["mask"] = "img/m0.png"
        lines.append(json.dumps(line))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    manifest = _manifest(root / "in", with_mask=True)
    cfg = _config(target_max_area=128 * 128, batch_size=1)
    build_cache(cfg, manifest, root / "cache", PoolEncoders(), shard_size=4, progress=False)
    return cfg, root


def test_manifest_mask_is_cached_at_latent_resolution(masked_cache):
    cfg, root = masked_cache
    recs = _records(root / "cache")
    by_name = {m["instruction"]: (a, m) for a, m in recs}
    arrays, meta = by_name["edit 0"]
    h, w = arrays["target"].shape[:2]
    # the mask resized with the target to the cached pixel size, then averaged over each 8x8 pixel block
    px = Image.open(root / "in" / "img" / "m0.png").convert("L").resize((w * 8, h * 8), Image.Resampling.LANCZOS)
    px = np.asarray(px, np.float32) / 255.0
    want = np.array([[px[8 * i:8 * i + 8, 8 * j:8 * j + 8].mean() for j in range(w)] for i in range(h)])
    np.testing.assert_allclose(arrays["loss_mask"], want, atol=1e-6)
    assert meta["mask"].endswith("m0.png") and "loss_mask" not in by_name["edit 1"][0]
    # streamed: per-token weight = the 2x2 latent-patch average; the record without a mask weighs 1
    stream = data.CacheStream(_with_mask_mode(cfg, "manifest", root / "cache"))
    seen = {}
    for _ in range(2):
        b = next(stream)
        seen[b["target"].shape[1]] = b["loss_weight"][0]
    m = arrays["loss_mask"]
    tokens = [m[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for i in range(h // 2) for j in range(w // 2)]
    np.testing.assert_allclose(seen[len(tokens)], tokens, atol=1e-6)
    other = [v for k, v in seen.items() if k != len(tokens)]
    assert len(other) == 1 and np.all(other[0] == 1.0)
    stream.close()


def _with_mask_mode(cfg, mode, cache_dir):
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(cache_dir)),
                               train=dataclasses.replace(cfg.train, loss_mask=mode))


def test_manifest_mode_without_masks_is_refused(tmp_path):
    manifest = _manifest(tmp_path / "in", with_mask=False)
    cfg = _config(target_max_area=128 * 128, batch_size=1)
    build_cache(cfg, manifest, tmp_path / "cache", PoolEncoders(), shard_size=4, progress=False)
    with pytest.raises(ValueError, match="no record of the cache .* has a mask"):
        data.CacheStream(_with_mask_mode(cfg, "manifest", tmp_path / "cache"))


def test_mask_of_another_size_is_bad_input_and_qflux_masks_are_read(tmp_path):
    manifest = _manifest(tmp_path / "in", with_mask=True)
    _mask(tmp_path / "in" / "img" / "m0.png", (100, 100), (0, 0, 50, 50))
    cfg = _config(target_max_area=128 * 128, batch_size=1)
    index = build_cache(cfg, manifest, tmp_path / "cache", PoolEncoders(), shard_size=4, progress=False,
                        skip_bad=True)
    skipped = [json.loads(x) for x in (tmp_path / "cache" / "skipped.jsonl").read_text().splitlines()]
    assert index["num_records"] == 1 and "is not the target's size" in skipped[0]["reason"]
    q = tmp_path / "qflux"
    (q / "training_images").mkdir(parents=True)
    (q / "control_images").mkdir()
    for name in ("a", "b"):
        draw_image(q / "training_images" / f"{name}.png", (64, 64), 1)
        draw_image(q / "control_images" / f"{name}.png", (64, 64), 2)
        (q / "training_images" / f"{name}.txt").write_text("edit")
    _mask(q / "training_images" / "a_mask.png", (64, 64), (0, 0, 10, 10))
    recs, bad = inputs.read_qflux(q)
    assert not bad and {r.target.rsplit("/", 1)[-1]: r.mask for r in recs} == {
        "a.png": str(q / "training_images" / "a_mask.png"), "b.png": None}
