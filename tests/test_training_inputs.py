"""What a LoRA learns from: editing pairs resized together at the geometry DreamOmni2 edits at, reference area
independent of the target, and qflux's dataset layout (against transcriptions in ``support/reference_code.py``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import reference_code as ref
from support.fixtures_data import draw_image, tiny_config, write_folder, SPECS
from dreamomni2_jax.cache import inputs
from dreamomni2_jax.cache.stage import build_cache
from dreamomni2_jax.cache.records import decode_record, load_index
from dreamomni2_jax.config import DataConfig
from dreamomni2_jax.images.io import BadInput
from dreamomni2_jax.images.sizes import pair_aspect_mismatch, reference_size


class PoolEncoders:
    """Cache-stage encoders whose "latents" are the 8x8-pooled pixels (shapes and content are checkable)."""

    downscale = 8
    image_batch = 4

    def __init__(self):
        self.images = []

    def encode_images(self, x):
        n, h, w, c = x.shape
        self.images += list(x)
        return x.reshape(n, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))

    def encode_text(self, prompts):
        return np.zeros((len(prompts), 4, 8), np.float32), np.zeros((len(prompts), 8), np.float32)


def _records(cache: Path) -> list[tuple[dict, dict]]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for s in load_index(cache)["shards"]:
        r = ArrayRecordReader(str(cache / s["file"]))
        out += [decode_record(b) for b in r.read(list(range(s["num_records"])))]
        r.close()
    return out


def _config(**data):
    return tiny_config(**{"target_max_area": 1024 * 1024, "reference_max_area": 1024 * 1024, "min_image_size": 32,
                          **data})


# --------------------------------------------------------------------------- item 1: aligned editing pairs

SOURCES = [(1920, 1080), (768, 1024), (1024, 1280)]  # 16:9, 3:4, 4:5


def _editing_manifest(root: Path, sources, other=(500, 700), target_scale=1.0) -> Path:
    lines = []
    for i, (w, h) in enumerate(sources):
        src = draw_image(root / f"src{i}.png", (w, h), 10 + i)
        tgt = root / f"tgt{i}.png"
        Image.open(src).resize((round(w * target_scale), round(h * target_scale)), Image.LANCZOS).save(tgt)
        extra = draw_image(root / f"ref{i}.png", other, 20 + i)
        lines.append(json.dumps({"instruction": f"edit {i}", "target": tgt.name,
                                 "references": [src.name, extra.name]}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    return root / "m.jsonl"


def test_editing_pairs_are_cached_at_the_source_geometry_dreamomni2_edits_at(tmp_path):
    """16:9, 3:4, 4:5 sources: the target is cached at exactly the size DreamOmni2's ``resizeinput`` gives the
    source (inference_edit.py samples at source_imgs[0].size), pixel-aligned with it; before, 1920x1080 gave a
    1360x768 target for a 1392x752 source."""
    root = tmp_path / "in"
    root.mkdir()
    manifest = _editing_manifest(root, SOURCES, target_scale=0.5)  # targets half the source's resolution
    enc = PoolEncoders()
    build_cache(_config(), manifest, tmp_path / "c", enc, progress=False)
    recs = _records(tmp_path / "c")
    assert len(recs) == len(SOURCES)
    for (arrays, meta), (w, h), i in zip(recs, SOURCES, range(len(SOURCES))):
        sw, sh = ref.resizeinput(Image.open(root / f"src{i}.png")).size
        ew, eh = ref.resizeinput(Image.open(root / f"ref{i}.png")).size
        assert meta["pixels"] == [[sw, sh], [sw, sh], [ew, eh]]
        assert arrays["target"].shape[:2] == arrays["ref0"].shape[:2] == (sh // 8, sw // 8)
        # the target is the source at half resolution: once resized to one size they agree up to resampling
        np.testing.assert_allclose(arrays["target"], arrays["ref0"], atol=0.06)
        old_w, old_h = ref.kontext_output_size(w // 2, h // 2)  # what the target got before (area fit on its own)
        assert (old_w, old_h) != (sw, sh)


@pytest.mark.parametrize("area", [512 * 512, 768 * 768])
def test_editing_pairs_at_a_smaller_target_area_keep_one_size(tmp_path, area):
    root = tmp_path / "in"
    root.mkdir()
    manifest = _editing_manifest(root, SOURCES)
    build_cache(_config(target_max_area=area), manifest, tmp_path / "c", PoolEncoders(), progress=False)
    for (arrays, meta), i in zip(_records(tmp_path / "c"), range(len(SOURCES))):
        sw, sh = ref.resizeinput(Image.open(root / f"src{i}.png")).size
        s = (area / 1024 ** 2) ** 0.5
        assert meta["pixels"][0] == meta["pixels"][1] == [int(sw * s) // 16 * 16, int(sh * s) // 16 * 16]
        np.testing.assert_array_equal(arrays["target"], arrays["ref0"])  # identical images, identical geometry
        # item 2: the other reference keeps the official ~1 MP Kontext size whatever the target area
        assert meta["pixels"][2] == list(ref.resizeinput(Image.open(root / f"ref{i}.png")).size)


def test_misaligned_editing_pair_is_bad_input_and_skippable(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    manifest = _editing_manifest(root, [(1920, 1080), (768, 1024)])
    Image.open(root / "src0.png").resize((1080, 1920)).save(root / "tgt0.png")  # portrait target, landscape source
    with pytest.raises(BadInput, match=r"m\.jsonl:1: editing pair not aligned.*1080x1920.*1920x1080"):
        build_cache(_config(), manifest, tmp_path / "c1", PoolEncoders(), progress=False)
    index = build_cache(_config(), manifest, tmp_path / "c2", PoolEncoders(), skip_bad=True, progress=False)
    assert index["num_records"] == 1 and index["num_skipped"] == 1
    assert [r["line"] for r in index["records"]] == [2]
    # the same images as a generation record: no pair, the target is sized like FluxKontextPipeline's output
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    lines[0]["task"] = "generation"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    build_cache(_config(), manifest, tmp_path / "c3", PoolEncoders(), progress=False)
    (_, meta), _ = _records(tmp_path / "c3")
    assert meta["task"] == "generation" and meta["pixels"][0] == list(ref.kontext_output_size(1080, 1920))


def test_aspect_tolerance():
    assert pair_aspect_mismatch((1920, 1080), (1916, 1080), 0.02) is None
    assert pair_aspect_mismatch((1920, 1080), (1080, 1080), 0.02) == pytest.approx(1920 / 1080 - 1)


# --------------------------------------------------------------------------- item 2: reference area


def test_reference_area_defaults_to_kontext_and_is_independent_of_the_target():
    d = DataConfig(target_max_area=512 * 512)
    assert d.reference_max_area == 1024 * 1024
    assert reference_size(1920, 1080, d.reference_max_area) == \
        ref.resizeinput(Image.new("RGB", (1920, 1080))).size


# --------------------------------------------------------------------------- item 4: qflux dataset layout


def _qflux_dataset(root: Path) -> Path:
    ti, ci = root / "training_images", root / "control_images"
    ti.mkdir(parents=True)
    ci.mkdir()
    # a: source + two more controls (png / jpg), instruction next to the target, a loss mask (not used)
    draw_image(ti / "a.png", (96, 64), 1)
    (ti / "a.txt").write_text("make the bag red\n")
    draw_image(ci / "a.png", (96, 64), 2)
    draw_image(ci / "a_control_1.png", (64, 64), 3)
    draw_image(ci / "a_control_2.jpg", (64, 96), 4)
    Image.new("L", (96, 64), 255).save(ci / "a_mask.png")
    # b: jpg target, instruction in control_images/, jpg source
    draw_image(ti / "b.jpg", (64, 64), 5)
    draw_image(ci / "b.jpg", (64, 64), 6)
    draw_image(ci / "b_control_1.png", (64, 96), 7)
    draw_image(ci / "b_control_2.png", (96, 64), 8)
    (ci / "b.txt").write_text("turn it blue")
    return root


def test_qflux_layout_reads_like_qflux(tmp_path):
    root = _qflux_dataset(tmp_path / "ds")
    recs, bad = inputs.read_inputs(root)
    assert not bad
    img_dir, ctl_dir = ref.find_directories(str(root))
    expected = sorted(ref.scan_image_files(img_dir, ctl_dir), key=lambda s: s["image"])
    assert [(r.target, list(r.references), r.instruction) for r in recs] == \
        [(s["image"], s["control"], Path(s["caption"]).read_text().strip()) for s in expected]
    # a target without control images is a generation record (qflux: controls = [])
    draw_image(root / "training_images" / "c.png", (64, 96), 9)
    (root / "training_images" / "c.txt").write_text("a cat")
    recs, bad = inputs.read_inputs(root)
    assert not bad and [r.resolved_task() for r in recs] == ["editing", "editing", "generation"]
    index = build_cache(tiny_config(), root, tmp_path / "c", PoolEncoders(), progress=False)
    assert index["num_records"] == 3 and [r["num_references"] for r in index["records"]] == [3, 3, 0]


@pytest.mark.parametrize("dirs", [("images", "control"), ("target_images", "condition_images")])
def test_qflux_directory_aliases(tmp_path, dirs):
    root = _qflux_dataset(tmp_path / "ds")
    os.rename(root / "training_images", root / dirs[0])
    os.rename(root / "control_images", root / dirs[1])
    recs, bad = inputs.read_inputs(root)
    assert not bad and len(recs) == 2 and Path(recs[0].target).parent.name == dirs[0]
    assert Path(recs[0].references[0]).parent.name == dirs[1]


def test_qflux_layout_reports_what_qflux_drops_silently(tmp_path):
    root = _qflux_dataset(tmp_path / "ds")
    os.remove(root / "control_images" / "b.txt")  # qflux: skipped without a word
    os.rename(root / "control_images" / "a_control_1.png", root / "control_images" / "a_control_3.png")  # gap
    draw_image(root / "control_images" / "lonely.png", (64, 64), 9)
    recs, bad = inputs.read_qflux(root)
    assert recs == []
    assert sorted(e.reason.split(" ")[0] for e in bad) == ["control", "controls", "instruction"], \
        [str(e) for e in bad]
    assert any("control_images/lonely" in e.where for e in bad)


def test_flat_layout_still_reads(tmp_path):
    recs, bad = inputs.read_inputs(write_folder(tmp_path / "f", SPECS[:2]))
    assert not bad and [len(r.references) for r in recs] == [1, 2]


def test_v1_caches_with_misaligned_pairs_are_refused(tmp_path):
    from dreamomni2_jax.cache.records import CacheError

    (tmp_path / "index.json").write_text(json.dumps({"format": "dreamomni2-cache", "version": 1}))
    with pytest.raises(CacheError, match="v1 cache .*re-run scripts/cache.py"):
        load_index(tmp_path)
