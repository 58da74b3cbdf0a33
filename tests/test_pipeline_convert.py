"""convert/pipeline.py: one-command conversion of a diffusers Flux Kontext folder, re-runs, failures, bad input."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dreamomni2_jax.convert import pipeline as cpipe
from dreamomni2_jax.weights import store
from dreamomni2_jax.weights.safetensors_io import open_checkpoint
from dreamomni2_jax.convert.loaders import load_clip
from dreamomni2_jax.convert.loaders import load_t5
from dreamomni2_jax.convert.loaders import load_vae
from dreamomni2_jax.weights.manifest import is_converted_pipeline, read_family, read_manifest

MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2")
COPIED = ("tokenizer", "tokenizer_2", "scheduler")


def _mtimes(out):
    return {c: (out / c / "params").stat().st_mtime_ns for c in MODELS}


@pytest.fixture(scope="module")
def converted(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "flux-kontext-jax"
    assert cpipe.main(["--src", str(tiny_pipeline_dir), "--out", str(out), "--no-progress"]) == 0
    return out


def test_layout_manifest_and_weights(converted, tiny_pipeline_dir):
    assert is_converted_pipeline(converted)
    manifest = read_manifest(converted)
    assert manifest["pipeline_class"] == "FluxKontextPipeline"
    assert manifest["family"] == read_family(converted) == "flux1"
    assert {c: manifest["components"][c].get("dtype") for c in MODELS} == {
        "transformer": "fp32", "vae": "fp32", "text_encoder": "fp32", "text_encoder_2": "fp32"}  # the source's
    for c in MODELS:
        assert store.is_converted(converted / c)
    for c in COPIED:
        src_files = sorted(p.relative_to(tiny_pipeline_dir / c) for p in (tiny_pipeline_dir / c).rglob("*"))
        assert src_files == sorted(p.relative_to(converted / c) for p in (converted / c).rglob("*"))
        for f in src_files:
            assert (converted / c / f).read_bytes() == (tiny_pipeline_dir / c / f).read_bytes()
    assert json.loads((converted / "model_index.json").read_text()) == json.loads(
        (tiny_pipeline_dir / "model_index.json").read_text())
    assert not list(converted.glob(".*"))  # no temp leftovers
    # Weights land where the source tensors say, bit for bit (the default keeps the source dtype).
    vae_src = open_checkpoint(tiny_pipeline_dir / "vae")
    vae = load_vae(converted / "vae", jnp.float32)
    assert np.array_equal(np.asarray(vae.decoder.up_blocks[0].upsamplers[0].conv.kernel[...]),
                          vae_src.read("decoder.up_blocks.0.upsamplers.0.conv.weight").transpose(2, 3, 1, 0))
    clip_src = open_checkpoint(tiny_pipeline_dir / "text_encoder")
    clip = load_clip(converted / "text_encoder", jnp.float32)
    assert np.array_equal(np.asarray(clip.final_layer_norm.scale[...]), clip_src.read("final_layer_norm.weight"))
    t5_src = open_checkpoint(tiny_pipeline_dir / "text_encoder_2")
    t5 = load_t5(converted / "text_encoder_2", jnp.float32)
    assert np.array_equal(np.asarray(t5.shared.embedding[...]), t5_src.read("shared.weight"))
    assert np.array_equal(np.asarray(t5.encoder.block[0].layer[1].DenseReluDense.wo.kernel[...]),
                          t5_src.read("encoder.block.0.layer.1.DenseReluDense.wo.weight").T)


def test_converted_folder_serves_text_encoders(converted):
    from dreamomni2_jax.text.flux1 import load_text_encoders

    enc = load_text_encoders(converted, jnp.float32)
    embeds, pooled = enc.encode_prompt(["a red ball on a blue table", ""], max_sequence_length=8)
    assert embeds.shape == (2, 8, 32) and pooled.shape == (2, 32)
    assert np.isfinite(np.asarray(embeds)).all() and np.isfinite(np.asarray(pooled)).all()


def test_rerun_skips_resumes_and_checks_dtype(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    cpipe.convert_pipeline(tiny_pipeline_dir, out, progress=False)
    before = _mtimes(out)
    cpipe.convert_pipeline(tiny_pipeline_dir, out, progress=False)  # everything present: nothing rewritten
    assert _mtimes(out) == before
    shutil.rmtree(out / "vae")
    shutil.rmtree(out / "tokenizer_2")
    cpipe.convert_pipeline(tiny_pipeline_dir, out, progress=False)  # only the missing ones are redone
    after = _mtimes(out)
    assert after["vae"] != before["vae"]
    assert {c: after[c] for c in MODELS if c != "vae"} == {c: before[c] for c in MODELS if c != "vae"}
    assert (out / "tokenizer_2" / "tokenizer.json").is_file() and is_converted_pipeline(out)
    with pytest.raises(ValueError) as e:
        cpipe.convert_pipeline(tiny_pipeline_dir, out, dtype="bf16", progress=False)
    for c in ("transformer", "text_encoder_2"):
        assert f"{out / c}: already converted with dtype 'fp32', requested 'bf16'" in str(e.value)
    assert "vae" not in str(e.value) and _mtimes(out) == after
    cpipe.convert_pipeline(tiny_pipeline_dir, out, dtype="bf16", overwrite=True, progress=False)
    assert read_manifest(out)["components"]["text_encoder_2"]["dtype"] == "bf16"
    t5 = load_t5(out / "text_encoder_2", jnp.float32)
    t5_src = open_checkpoint(tiny_pipeline_dir / "text_encoder_2")
    assert np.array_equal(np.asarray(t5.shared.embedding[...]),
                          t5_src.read("shared.weight").astype(ml_dtypes.bfloat16).astype(np.float32))


def test_interrupted_conversion_leaves_no_partial_output(tiny_pipeline_dir, tmp_path, monkeypatch):
    import dreamomni2_jax.convert.component

    real_write = dreamomni2_jax.convert.component.write_checkpoint

    def failing_write(out, items, config, **kw):
        if "text_encoder_2" not in str(out):  # only T5, converted after text_encoder/transformer/vae
            return real_write(out, items, config, **kw)

        def items_then_fail():
            for n, item in enumerate(items):
                if n == 5:
                    raise KeyboardInterrupt("simulated interruption")
                yield item
        return real_write(out, items_then_fail(), config, **kw)

    monkeypatch.setattr(dreamomni2_jax.convert.component, "write_checkpoint", failing_write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        cpipe.convert_pipeline(tiny_pipeline_dir, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "transformer", "vae"]
    assert not is_converted_pipeline(out)
    monkeypatch.undo()
    cpipe.convert_pipeline(tiny_pipeline_dir, out, progress=False)
    assert is_converted_pipeline(out) and store.is_converted(out / "text_encoder_2")


def test_bad_source_names_each_problem(tiny_pipeline_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_pipeline_dir, src)
    shutil.rmtree(src / "vae")
    cfg_path = src / "text_encoder" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "architectures": ["T5EncoderModel"]}))
    with pytest.raises(ValueError) as e:
        cpipe.convert_pipeline(src, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "vae: component 'vae' missing" in msg
    assert "text_encoder/config.json: architectures is ['T5EncoderModel'], component 'text_encoder' must be " \
           "'CLIPTextModel'" in msg
    assert not (tmp_path / "out").exists()  # validated before anything is written
    shutil.copytree(tiny_pipeline_dir / "vae", src / "vae")
    shutil.copy(tiny_pipeline_dir / "text_encoder" / "config.json", cfg_path)
    sched = src / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "_class_name": "DDIMScheduler"}))
    with pytest.raises(ValueError, match=r"scheduler_config\.json: _class_name is 'DDIMScheduler'"):
        cpipe.validate_source(src)
    shutil.copy(tiny_pipeline_dir / "scheduler" / "scheduler_config.json", sched)
    index = src / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match=r"model_index\.json: _class_name is 'StableDiffusionPipeline'"):
        cpipe.validate_source(src)
    index.unlink()
    with pytest.raises(ValueError, match=r"model_index\.json: missing"):
        cpipe.validate_source(src)
