"""Validation hook: grid PNG under run_dir/samples and a TensorBoard event file holding the same image."""
from __future__ import annotations

import io
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dreamomni2_jax.config import Config, DataConfig, ModelConfig, SampleConfig, ValidationSample
from dreamomni2_jax.images.io import BadInput
from dreamomni2_jax.lora.layers import apply_lora
from dreamomni2_jax.convert.loaders import load_flux
from dreamomni2_jax.images.grid import make_grid
from dreamomni2_jax.callbacks.validation import make_validation_callback


def _events(path):
    """Parse a TFRecord event file (length, crc, data, crc records) into tensorboardX Event protos."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        ev = Event()
        ev.ParseFromString(data[i + 12:i + 12 + n])
        out.append(ev)
        i += 12 + n + 4
    return out


@pytest.fixture(scope="module")
def ref_png(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((64, 48))
    path = tmp_path_factory.mktemp("val") / "ref.png"
    img.save(path)
    return path


def _cfg(ref, every=2, **sample):
    entries = (ValidationSample("put the hat from image 2 on the person in image 1", (str(ref),), seed=0,
                                height=32, width=48),
               ValidationSample("turn the background white", (str(ref),), seed=1, height=32, width=48))
    return Config(model=ModelConfig(compute_dtype="float32", param_dtype="float32"),
                  data=DataConfig(target_max_area=48 * 64, reference_max_area=48 * 64, max_sequence_length=32),
                  sample=SampleConfig(steps=2, every_steps=every, validation=entries, **sample))


def test_hook_writes_grid_png_and_tensorboard_image(tiny_pipeline_dir, ref_png, tmp_path):
    model = load_flux(tiny_pipeline_dir / "transformer", dtype=jnp.float32)
    apply_lora(model, [r"attn\.to_q"], rank=2, alpha=2.0)  # what the training loop passes: a LoRA-patched model
    run = tmp_path / "run"
    hook = make_validation_callback(_cfg(ref_png, true_cfg_scale=2.0, negative_prompt="blurry"),
                                lambda m: m["flux"], tiny_pipeline_dir, run)
    hook(1, {"flux": model})
    assert not (run / "samples").exists() and not (run / "tb").exists()
    hook(2, {"flux": model})
    hook.close()
    png = run / "samples" / "step_000002.png"
    grid = np.asarray(Image.open(png))
    # rows: prompt line, then ref 64x48 and output 48x32 at 256
    assert grid.shape == (2 * (16 + 256 + 4) + 4, 4 + 341 + 4 + 384 + 4, 3)
    out_a, out_b = grid[20:276, 349:733], grid[296:552, 349:733]
    for y in (4, 280):  # the prompt is written on each row's caption line
        np.testing.assert_array_equal(grid[y:y + 16], _caption_of(hook, y // 276, grid.shape[1]))
        assert (grid[y:y + 16] < 128).any()
    assert out_a.std() > 5 and np.abs(out_a.astype(int) - out_b.astype(int)).max() > 20
    files = list((run / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    images = [(ev.step, v) for ev in _events(files[0]) for v in ev.summary.value if v.HasField("image")]
    assert [(step, v.tag) for step, v in images] == [(2, "validation")]
    logged = np.asarray(Image.open(io.BytesIO(images[0][1].image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(logged, grid)
    assert not list(run.rglob(".*tmp*"))


def test_disabled_hook_and_bad_reference(tiny_pipeline_dir, ref_png, tmp_path):
    hook = make_validation_callback(_cfg(ref_png, every=0), None, tiny_pipeline_dir, tmp_path / "run")
    assert not hook.enabled
    hook(10, object())
    assert not (tmp_path / "run").exists()
    with pytest.raises(BadInput, match=r"sample\.validation\[0\].*not found.*nope\.png"):
        make_validation_callback(_cfg(tmp_path / "nope.png"), None, tiny_pipeline_dir, tmp_path / "run")


def test_preview_sizes_follow_dreamomni2():
    """Editing previews at the source's size (inference_edit.py: height/width = resizeinput(source)), generation
    previews at 1024x1024 (inference_gen.py) for the 1 MP target budget; set sizes win."""
    from support import reference_code as ref
    from dreamomni2_jax.callbacks.validation import preview_size

    area = 1024 * 1024
    for wh in [(1920, 1080), (768, 1024), (1000, 1250)]:
        want = ref.resizeinput(Image.new("RGB", wh)).size
        assert preview_size(ValidationSample("p", ("src.png",)), wh, area) == (want[1], want[0])
    assert preview_size(ValidationSample("p"), None, area) == (1024, 1024)
    assert preview_size(ValidationSample("p", ("ref.png",), task="generation"), (1920, 1080), area) == (1024, 1024)
    assert preview_size(ValidationSample("p", ("src.png",), height=32, width=48), (1920, 1080), area) == (32, 48)


def _caption_of(hook, row, width):
    from dreamomni2_jax.images.grid import _caption

    return _caption(hook.samples[row].prompt, width)


def test_make_grid_layout():
    a = np.zeros((10, 20, 3), np.uint8)
    b = np.full((20, 10, 3), 7, np.uint8)
    g = make_grid([[a, b], [b]], row_height=10, pad=1)
    assert g.shape == (2 * 11 + 1, 1 + 20 + 1 + 5 + 1, 3)
    assert (g[1:11, 1:21] == 0).all() and (g[1:11, 22:27] == 7).all() and (g[0] == 255).all()
    with pytest.raises(ValueError):
        make_grid([])
    c = make_grid([[a, b], [b]], row_height=10, pad=1, captions=["x" * 500, ""])
    assert c.shape == (2 * (16 + 11) + 1, 28, 3) and (c[17:27, 1:21] == 0).all()
    assert (c[1:17] < 128).any() and (c[28:44] == 255).all()  # a long prompt is cut to fit; an empty one is blank


def test_eval_records_row_shows_references_sample_and_target(tiny_cache, tiny_converted_dir, tiny_pipeline_dir,
                                                             tmp_path):
    """``sample.eval_records``: held-out records get a row ``references | sample | target`` captioned with their
    instruction; the references and target are the cached latents decoded by diffusers' AutoencoderKL."""
    import dataclasses

    import torch
    from diffusers import AutoencoderKL

    from dreamomni2_jax.cache.records import decode_record, load_index
    from dreamomni2_jax.images.grid import CAPTION_HEIGHT, _caption, _fit_height
    from dreamomni2_jax.callbacks.validation import ValidationCallback
    from array_record.python.array_record_module import ArrayRecordReader

    from dreamomni2_jax.config import ConfigError

    cfg, _, cache = tiny_cache
    with pytest.raises(ConfigError, match="sample.eval_records > 0 needs data.eval_cache_dir"):
        dataclasses.replace(cfg, sample=SampleConfig(eval_records=1))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_cache_dir=str(cache)),
                              sample=SampleConfig(steps=2, every_steps=1, eval_records=2))
    model = load_flux(tiny_converted_dir / "transformer", dtype=jnp.float32)
    apply_lora(model, [r"attn\.to_q"], rank=2, alpha=2.0)
    shard = load_index(cache)["shards"][0]["file"]
    reader = ArrayRecordReader(str(cache / shard))
    records = [decode_record(bytes(x)) for x in reader.read([0, 1])]
    reader.close()
    height = 64
    hook = ValidationCallback(cfg, lambda m: m, tiny_converted_dir, tmp_path / "run", row_height=height)
    assert hook.enabled and len(hook.eval_records) == 2
    hook(1, model)
    hook.close()
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_000001.png"))

    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir / "vae", torch_dtype=torch.float32).eval()
    c = vae.config

    def decoded(z):  # diffusers: latents / scaling_factor + shift_factor -> vae.decode -> [0, 1] -> uint8
        x = torch.from_numpy(np.asarray(z, np.float32)).permute(2, 0, 1)[None] / c.scaling_factor + c.shift_factor
        with torch.no_grad():
            img = vae.decode(x).sample[0].permute(1, 2, 0).numpy()
        return (np.clip(img / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)

    pad, y = 4, 4
    for arrays, meta in records:
        caption = grid[y:y + CAPTION_HEIGHT]
        np.testing.assert_array_equal(caption, _caption(meta["instruction"], grid.shape[1]))
        y += CAPTION_HEIGHT
        refs = [decoded(arrays[f"ref{j}"]) for j in range(len(meta["references"]))]
        target = decoded(arrays["target"])
        x = pad
        for ref in refs:  # references first
            want = _fit_height(ref, height)
            got = grid[y:y + height, x:x + want.shape[1]]
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
            x += want.shape[1] + pad
        sample_w = _fit_height(target, height).shape[1]  # the sample has the target's size
        sample = grid[y:y + height, x:x + sample_w]
        x += sample_w + pad
        want = _fit_height(target, height)
        got = grid[y:y + height, x:x + want.shape[1]]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2  # the target, last
        assert np.abs(sample.astype(int) - got.astype(int)).mean() > 5  # the sample is not the target
        assert (grid[y:y + height, x + want.shape[1]:] == 255).all()
        y += height + pad
    assert y == grid.shape[0]
