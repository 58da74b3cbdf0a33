"""FLUX.2 LoRA files (diffusers/PEFT and kohya/BFL layouts, from the FLUX.2 schema) vs diffusers' own FLUX.2 LoRA
loader and kohya converter on the tiny klein transformer: same outputs as our adapted model."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from support.asserts import assert_adapter_close
from dreamomni2_jax.lora import files as L
from dreamomni2_jax.layout import ids_klein as P2
from dreamomni2_jax.convert.flux2_transformer import main as convert_main
from dreamomni2_jax.config import LoraConfig
from dreamomni2_jax.convert.loaders import load_flux2
from dreamomni2_jax.lora.attach import attach_lora, layer_counts
from dreamomni2_jax.lora.layers import apply_lora, lora_state, set_lora_state
from dreamomni2_jax.layout.ids_flux1 import SampleLayout
from dreamomni2_jax.testing.tiny_klein import save_flux2_transformer

# every kind of FLUX.2 Linear: fused single-block projections, text stream, SwiGLU MLP, modulations, the final
# layer's (BFL-swapped) modulation and the embedders
WIDE = (r"^x_embedder$", r"^context_embedder$", r"^proj_out$", r"^norm_out\.linear$", r"modulation_img\.linear",
        r"single_stream_modulation", r"attn\.add_q_proj", r"attn\.to_add_out", r"ff\.linear_in",
        r"ff_context\.linear_out", r"time_guidance_embed\.timestep_embedder\.linear_2")
# what diffusers' kohya FLUX.2 converter maps (it warns about and drops modulation keys)
KOHYA = (r"^x_embedder$", r"^proj_out$", r"add_k_proj", r"ff\.linear_out", r"ff_context\.linear_in", r"to_add_out")


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """(our fp32 base model, diffusers Flux2Transformer2DModel) of one tiny klein checkpoint."""
    from diffusers import Flux2Transformer2DModel

    src = save_flux2_transformer(tmp_path_factory.mktemp("lora_flux2") / "transformer", seed=3)
    out = src.parent / "converted"
    assert convert_main(["--src", str(src), "--out", str(out), "--dtype", "fp32", "--no-progress"]) == 0
    return load_flux2(out, dtype=jnp.float32), Flux2Transformer2DModel.from_pretrained(src).eval()


@pytest.fixture(scope="module")
def inputs(klein):
    layout, n_txt, c = SampleLayout(target=(4, 6), references=((4, 4),)), 6, klein[0].config
    rng = np.random.default_rng(0)
    n = layout.target_tokens + layout.reference_tokens
    return dict(hidden_states=rng.standard_normal((2, n, c.in_channels), np.float32),
                encoder_hidden_states=rng.standard_normal((2, n_txt, c.joint_attention_dim), np.float32),
                timestep=np.array([0.3, 0.8], np.float32), img_ids=P2.sample_ids(layout), txt_ids=P2.text_ids(n_txt))


def _adapted(base, alpha: float, preset: str = "klein_wide", targets=(), rank: int = 4, seed: int = 1):
    model = nnx.clone(base)
    if preset == "custom":
        apply_lora(model, targets, rank=rank, alpha=alpha, seed=seed)
    else:
        attach_lora(model, config=LoraConfig(rank=rank, alpha=alpha, preset=preset, targets=tuple(targets)), seed=seed)
    rng = np.random.default_rng(seed)
    set_lora_state(model, {k: np.asarray(v) + (0.3 * rng.standard_normal(v.shape).astype(np.float32)
                                               if k.endswith("lora_B") else 0) for k, v in lora_state(model).items()})
    return model


def _ours(model, inputs):
    return np.asarray(nnx.jit(lambda m, kw: m(**kw))(model, inputs))


def _diffusers(torch_model, path, inputs):
    from diffusers import Flux2KleinPipeline

    state, meta = Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    torch_model.load_lora_adapter(state, prefix="transformer", adapter_name="t", metadata=meta)
    try:
        with torch.no_grad():
            kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
            return torch_model(**kw, return_dict=False)[0].numpy()
    finally:
        torch_model.delete_adapters("t")


@pytest.mark.parametrize("alpha", [4.0, 12.0], ids=["alpha=rank", "alpha!=rank"])
def test_diffusers_export_loads_in_diffusers_flux2(klein, inputs, tmp_path, alpha):
    base, torch_model = klein
    model = _adapted(base, alpha, targets=WIDE)
    path = L.save_lora_file(tmp_path / "pytorch_lora_weights.safetensors", lora_state(model), alpha)
    with safe_open(str(path), "np") as f:
        assert "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_B.weight" in f.keys()
    assert_adapter_close(_ours(model, inputs), _diffusers(torch_model, path, inputs), 1e-4,
                         _ours(base, inputs))


@pytest.mark.parametrize("alpha", [4.0, 12.0], ids=["alpha=rank", "alpha!=rank"])
def test_kohya_export_matches_diffusers_flux2_kohya_conversion(klein, inputs, tmp_path, alpha):
    base, torch_model = klein
    model = _adapted(base, alpha, targets=KOHYA)
    path = L.save_lora_file(tmp_path / "kohya.safetensors", lora_state(model), alpha, format="kohya")
    d = base.config.inner_dim
    with safe_open(str(path), "np") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_base_model_version"] == "flux2"
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight").shape == (3 * d, 12)
        # the fused single-block projections are one Linear each: no split, no zero blocks
        assert f.get_tensor("lora_unet_single_blocks_1_linear1.lora_down.weight").shape == (4, d)
    assert {"lora_unet_single_blocks_0_linear2.alpha", "lora_unet_double_blocks_1_txt_mlp_0.lora_up.weight",
            "lora_unet_img_in.lora_down.weight", "lora_unet_final_layer_linear.alpha"} <= keys
    assert_adapter_close(_ours(model, inputs), _diffusers(torch_model, path, inputs), 1e-4,
                         _ours(base, inputs))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_through_files_is_exact_and_applies_to_the_model(klein, inputs, tmp_path, fmt):
    base, _ = klein
    model = _adapted(base, 8.0, targets=WIDE)
    path = L.save_lora_file(tmp_path / f"{fmt}.safetensors", lora_state(model), 8.0, format=fmt)
    flat, meta = L.load_lora_file(path, layer_counts(model), schema="flux2")
    want = {k: np.asarray(v) for k, v in lora_state(model).items()}
    assert flat.keys() == want.keys() and meta["rank"] == 4 and meta["alpha"] == 8.0
    for k in want:
        np.testing.assert_allclose(flat[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    fresh = nnx.clone(base)
    attach_lora(fresh, path)  # the kohya names are read with the model's (FLUX.2) schema
    np.testing.assert_allclose(_ours(fresh, inputs), _ours(model, inputs), rtol=1e-5, atol=1e-6)
    if fmt == "kohya":  # the file says flux2: read without being told
        assert L.load_lora_file(path)[1]["targets"] == meta["targets"]
