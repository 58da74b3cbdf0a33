"""CLIP-L and T5 encoders: parity with transformers CLIPTextModel / T5EncoderModel, converter layouts and errors."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from support.asserts import assert_close
from dreamomni2_jax.convert import clip as cclip
from dreamomni2_jax.convert import t5 as ct5
from dreamomni2_jax.weights.safetensors_io import open_checkpoint, save_arrays
from dreamomni2_jax.weights.store import ConversionError
from dreamomni2_jax.testing import tiny_flux1 as tiny
from dreamomni2_jax.convert.loaders import load_clip
from dreamomni2_jax.convert.loaders import load_t5

TOL = 1e-4


@nnx.jit
def _run(model, ids):
    return model(ids)


def _clip_ids(eos: int) -> np.ndarray:
    """Three 77-token rows where the first eos position, the argmax position and the last position all differ."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=(3, 77))
    ids[0, 5], ids[0, 6:] = eos, 1  # eos then padding (pad id 1 == eos id 1 in the fixture)
    ids[1, 40], ids[1, 41:] = eos, eos
    ids[2, 10], ids[2, 30], ids[2, 50] = eos, 255, eos  # 255 is the highest id: the legacy argmax branch picks 30
    return ids


@pytest.mark.parametrize("eos", [1, 2])
def test_clip_matches_transformers(tiny_pipeline_dir, tmp_path, eos):
    """eos_token_id 1 (transformers' first-eos pooling) and 2 (legacy argmax pooling, the Flux CLIP-L config)."""
    from transformers import CLIPTextModel

    src = tiny_pipeline_dir / "text_encoder" if eos == 1 else tiny.save_clip(tmp_path / "clip", eos_token_id=2)
    out = cclip.convert(src, tmp_path / "out", progress=False)
    ref = CLIPTextModel.from_pretrained(src, torch_dtype=torch.float32).eval()
    ids = _clip_ids(eos)
    with torch.no_grad():
        o = ref(torch.from_numpy(ids))
    h, pooled = _run(load_clip(out, jnp.float32), jnp.asarray(ids, jnp.int32))
    assert_close(h, o.last_hidden_state.numpy(), TOL)
    assert_close(pooled, o.pooler_output.numpy(), TOL)


def test_clip_transformers4_prefix_and_position_ids(tiny_pipeline_dir, tmp_path):
    """Older checkpoints: ``text_model.`` key prefix and a stored ``position_ids`` buffer."""
    src = tmp_path / "clip"
    src.mkdir()
    shutil.copy(tiny_pipeline_dir / "text_encoder" / "config.json", src)
    reader = open_checkpoint(tiny_pipeline_dir / "text_encoder")
    tensors = {f"text_model.{k}": reader.read(k) for k in reader.keys()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_arrays(src / "model.safetensors", tensors)
    ours = load_clip(src, jnp.float32)
    assert np.array_equal(np.asarray(ours.encoder.layers[1].mlp.fc1.kernel[...]),
                          reader.read("encoder.layers.1.mlp.fc1.weight").T)
    assert np.array_equal(np.asarray(ours.embeddings.token_embedding.embedding[...]),
                          reader.read("embeddings.token_embedding.weight"))


@pytest.fixture(scope="module")
def t5_ref(tiny_pipeline_dir):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(tiny_pipeline_dir / "text_encoder_2", torch_dtype=torch.float32).eval()


def test_t5_matches_transformers(tiny_pipeline_dir, t5_ref, tmp_path):
    out = ct5.convert(tiny_pipeline_dir / "text_encoder_2", tmp_path / "t5", dtype="fp32", progress=False)
    ids = np.random.default_rng(1).integers(0, 128, size=(2, 40))  # > max_distance 16: log buckets used
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        ref = t5_ref(torch.from_numpy(ids)).last_hidden_state.numpy()
        ref_masked = t5_ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    model = load_t5(out, jnp.float32)
    assert_close(_run(model, jnp.asarray(ids, jnp.int32)), ref, TOL)
    masked = nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert_close(masked[:, :25], ref_masked[:, :25], TOL)  # padded query rows are unused downstream


def test_t5_bf16_keeps_fp32_where_needed(tiny_pipeline_dir, t5_ref, tmp_path):
    """Default bf16 conversion: wo and the RMS norms stay fp32; output close to the fp32 reference."""
    out = ct5.convert(tiny_pipeline_dir / "text_encoder_2", tmp_path / "t5", progress=False)
    model = load_t5(out, jnp.bfloat16)
    ffn = model.encoder.block[1].layer[1]
    assert ffn.DenseReluDense.wo.kernel.dtype == jnp.float32 and ffn.layer_norm.scale.dtype == jnp.float32
    assert ffn.DenseReluDense.wi_0.kernel.dtype == jnp.bfloat16
    ids = np.random.default_rng(2).integers(0, 128, size=(2, 24))
    with torch.no_grad():
        ref = t5_ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    h = _run(model, jnp.asarray(ids, jnp.int32))
    assert h.dtype == jnp.bfloat16
    assert_close(h, ref, 0.1)


def test_t5_sharded_checkpoint(tmp_path):
    """Sharded safetensors + index (as the real text_encoder_2) converts to the same parameters."""
    src = tiny.save_t5(tmp_path / "t5", max_shard_size="10KB")
    assert list(src.glob("*.safetensors.index.json"))
    model = load_t5(src, jnp.float32)
    reader = open_checkpoint(src)
    assert np.array_equal(np.asarray(model.shared.embedding[...]), reader.read("shared.weight"))
    rel = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.embedding[...]
    assert np.array_equal(np.asarray(table), reader.read(rel))
    assert np.array_equal(np.asarray(model.encoder.block[1].layer[1].DenseReluDense.wo.kernel[...]),
                          reader.read("encoder.block.1.layer.1.DenseReluDense.wo.weight").T)


def test_bad_inputs(tiny_pipeline_dir, tmp_path):
    clip_src = tmp_path / "clip"
    shutil.copytree(tiny_pipeline_dir / "text_encoder", clip_src)
    cfg = json.loads((clip_src / "config.json").read_text())
    (clip_src / "config.json").write_text(json.dumps({**cfg, "architectures": ["T5EncoderModel"]}))
    with pytest.raises(ValueError, match=r"clip/config\.json: architectures=\['T5EncoderModel'\]"):
        cclip.build_plan(clip_src)
    (clip_src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError, match=r"missing key encoder\.layers\.2\.self_attn\.q_proj\.weight"):
        cclip.build_plan(clip_src)
    t5_src = tmp_path / "t5"
    shutil.copytree(tiny_pipeline_dir / "text_encoder_2", t5_src)
    (t5_src / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"t5/config\.json"):
        ct5.build_plan(t5_src)
    shutil.copy(tiny_pipeline_dir / "text_encoder_2" / "config.json", t5_src)
    cfg = json.loads((t5_src / "config.json").read_text())
    (t5_src / "config.json").write_text(json.dumps({**cfg, "d_ff": 40}))
    with pytest.raises(ConversionError, match=r"DenseReluDense\.wi_0\.weight: expected shape \[40, 32\]"):
        ct5.build_plan(t5_src)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16)])
def test_t5_relative_buckets_match_transformers(num_buckets, max_distance):
    """Flux's T5-XXL settings (32 buckets, distance 128) over a full 512-token sequence."""
    from transformers.models.t5.modeling_t5 import T5Attention

    from dreamomni2_jax.models.t5 import relative_position_bucket

    pos = np.arange(512)
    rel = pos[None, :] - pos[:, None]
    ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=True,
                                                num_buckets=num_buckets, max_distance=max_distance).numpy()
    assert np.array_equal(relative_position_bucket(rel, num_buckets, max_distance), ref)
