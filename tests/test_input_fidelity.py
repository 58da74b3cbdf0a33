"""Inputs are read as the reference pipeline reads them, bad ones are named and skippable, and the runtime path
stays torch-free; LoRA files with NaN / inf are refused everywhere they enter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamomni2_jax.cache import inputs
from dreamomni2_jax.images.io import BadInput
from dreamomni2_jax.images.io import open_image

REPO = Path(__file__).resolve().parents[1]


def _photo(h=24, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_exif_orientation_like_diffusers_load_image(tmp_path):
    from diffusers.utils import load_image

    for orientation in (3, 6, 8):
        img = Image.fromarray(_photo())
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        img.save(path, exif=exif)
        want = np.asarray(load_image(str(path)))
        got = np.asarray(open_image(str(path), "test"))
        assert want.shape != (24, 40, 3) or orientation == 3  # 6 and 8 turn the image by 90 degrees
        np.testing.assert_array_equal(got, want)


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (32, 48), dtype=np.uint16)  # multiples of 16: no resize
    path = tmp_path / "g16.png"
    Image.fromarray(gray * 257).save(path)  # the 16-bit image of the 8-bit gray one
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    got = np.asarray(open_image(str(path), "test"))
    np.testing.assert_array_equal(got, np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1))
    from dreamomni2_jax.sample.pipeline import reference_pixels

    with Image.open(path) as im:  # a PIL image handed to the sampler directly
        px = reference_pixels(im.copy(), auto_resize=False)
    np.testing.assert_allclose(px[..., 0], gray.astype(np.float32) / 127.5 - 1.0, atol=1e-6)


def test_non_utf8_inputs_and_extreme_sizes_are_bad_inputs(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"instruction": "ok", "target": "a.png"}\n{"instruction": "caf\xe9", "target": "a.png"}\n')
    records, bad = inputs.read_manifest(m)
    assert len(records) == 1 and [str(b) for b in bad] == [
        f"{m}:2: not UTF-8 text ('utf-8' codec can't decode byte 0xe9 in position 20: invalid continuation byte)"]
    folder = tmp_path / "q"
    folder.mkdir()
    Image.fromarray(_photo()).save(folder / "a.png")
    (folder / "a.txt").write_bytes(b"\xff\xfe")
    records, bad = inputs.read_folder(folder)
    assert not records and bad[0].where == str(folder / "a") and bad[0].path == str(folder / "a.txt")


def test_skip_bad_skips_extreme_aspect_and_non_utf8(tiny_converted_dir, tiny_encoders, tmp_path):
    from dreamomni2_jax.cache.stage import build_cache
    from support.fixtures_data import tiny_config

    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_photo(64, 64)).save(d / "t.png")
    Image.fromarray(np.zeros((32, 4000, 3), np.uint8)).save(d / "wide.png")
    m = d / "m.jsonl"
    m.write_bytes(b'{"instruction": "ok", "target": "t.png", "references": ["t.png"]}\n'
                  b'{"instruction": "wide", "target": "wide.png"}\n'
                  b'{"instruction": "caf\xe9", "target": "t.png"}\n')
    cfg = tiny_config(tiny_converted_dir)
    wide = d / "wide.jsonl"
    wide.write_text('{"instruction": "ok", "target": "t.png"}\n{"instruction": "wide", "target": "wide.png"}\n')
    with pytest.raises(BadInput, match=f"{wide}:2: .*empty target size"):
        build_cache(cfg, wide, tmp_path / "c0", tiny_encoders, progress=False)
    index = build_cache(cfg, m, tmp_path / "c", tiny_encoders, skip_bad=True, progress=False)
    assert index["num_records"] == 1 and index["num_skipped"] == 2
    where = [json.loads(x)["where"] for x in (tmp_path / "c" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(where) == [f"{m}:2", f"{m}:3"]


def test_nonfinite_lora_is_refused_by_export_and_init_from(tmp_path):
    from dreamomni2_jax.lora import files as lora_io

    flat = {"transformer_blocks.attn.to_q.lora_A": np.zeros((1, 32, 2), np.float32),
            "transformer_blocks.attn.to_q.lora_B": np.full((1, 2, 32), np.inf, np.float32)}
    with pytest.raises(lora_io.LoraFileError, match="hold NaN or inf values"):
        lora_io.save_lora_file(tmp_path / "x.safetensors", flat, 2.0)
    assert not (tmp_path / "x.safetensors").exists()
    from safetensors.numpy import save_file

    key = "transformer.transformer_blocks.0.attn.to_q.lora_{}.weight"
    path = tmp_path / "nan.safetensors"
    save_file({key.format("A"): np.full((2, 32), np.nan, np.float32), key.format("B"): np.zeros((32, 2), np.float32)},
              str(path))
    from dreamomni2_jax.config import LoraConfig
    from dreamomni2_jax.lora.attach import attach_lora
    from dreamomni2_jax.testing.tiny_flux1 import flux_model

    model = flux_model(0)
    with pytest.raises(lora_io.LoraFileError, match=f"{path}: 1 adapter tensor\\(s\\) hold NaN"):
        attach_lora(model, config=LoraConfig(rank=2, alpha=2.0, init_from=str(path)))


def test_runtime_path_never_imports_torch_and_digest_ignores_sharding(tiny_pipeline_dir, tiny_converted_dir,
                                                                       tmp_path):
    """torch is installed here (the ``ref`` extra): converting, text encoding, TensorBoard, LoRA files and the
    training / sampling modules must still not import it (tensorboardX tries to, unless told not to). Digests: same on 8 shards as on one device."""
    import importlib.util

    assert importlib.util.find_spec("torch") is not None
    model = tmp_path / "model"
    os.symlink(tiny_converted_dir, model)
    os.symlink(tiny_pipeline_dir, tmp_path / "src")
    script = Path(__file__).resolve().parent / "support" / "runtime_imports.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(REPO)}
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, str(script), str(model), str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert res["torch_loaded"] == []  # torch is importable here, so any import of it would have loaded it
    assert res["devices"] == 8 and res["sharded"] == res["digest"]
    assert res["flipped"]["x"] != res["digest"]["x"] and res["flipped"]["y"] == res["digest"]["y"]
    assert list((tmp_path / "out" / "tb").iterdir())  # the event file was written
