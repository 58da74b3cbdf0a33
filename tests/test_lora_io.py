"""LoRA files vs the real diffusers/PEFT loaders and writers on the tiny Flux Kontext pipeline."""
from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from support.asserts import assert_adapter_close, assert_close
from dreamomni2_jax.convert.flux_transformer import main as convert_main
from dreamomni2_jax.tools.export_lora import main as export_main
from dreamomni2_jax.checkpoint import store as C
from dreamomni2_jax.lora import files as L
from dreamomni2_jax.lora import kohya as K
from dreamomni2_jax.layout import ids_flux1 as P
from dreamomni2_jax.lora.attach import attach_lora, layer_counts
from dreamomni2_jax.config import LoraConfig
from dreamomni2_jax.lora.layers import (LoRAParam, apply_lora, lora_metadata, lora_modules, lora_state,
    set_lora_state)
from dreamomni2_jax.convert.loaders import load_flux

WIDE = [r"attn\.to_q", r"attn\.to_k", r"attn\.to_v", r"attn\.to_out\.0", r"attn\.add_k_proj", r"proj_mlp",
        r"norm_out\.linear", r"single_transformer_blocks\.proj_out", r"ff\.net\.2", r"x_embedder"]
# diffusers' kohya converter hard-codes Flux-dev sizes for single-block linear1 (checked separately below) and
# drops top-level modules, so the end-to-end kohya test adapts double blocks and unfused single-block layers.
KOHYA = [r"^transformer_blocks\.", r"single_transformer_blocks\.proj_out", r"single_transformer_blocks\.norm\.linear"]


@pytest.fixture(scope="module")
def base_model(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_io") / "flux32"
    assert convert_main(["--src", str(tiny_pipeline_dir / "transformer"), "--out", str(out), "--dtype", "fp32",
                         "--no-progress"]) == 0
    return load_flux(out, dtype=jnp.float32)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def inputs(base_model):
    rng = np.random.default_rng(0)
    layout = P.SampleLayout(target=(4, 6), references=((4, 4),))
    c, n = base_model.config, layout.target_tokens + layout.reference_tokens
    return dict(hidden_states=rng.standard_normal((2, n, c.in_channels), np.float32),
                encoder_hidden_states=rng.standard_normal((2, 7, c.joint_attention_dim), np.float32),
                pooled_projections=rng.standard_normal((2, c.pooled_projection_dim), np.float32),
                timestep=np.array([0.3, 0.8], np.float32), img_ids=layout.ids(), txt_ids=P.text_ids(7),
                guidance=np.full(2, 3.5, np.float32))


def _torch_out(transformer, inputs):
    with torch.no_grad():
        kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        return transformer(**kw, return_dict=False)[0].numpy()


def _jax_out(model, inputs):
    return np.asarray(nnx.jit(lambda m, kw: m(**kw))(model, inputs))


def _adapted(base_model, patterns, alpha, rank=4, seed=1):
    """Fresh copy of the base model with random (non-zero) adapters."""
    model = nnx.clone(base_model)
    apply_lora(model, patterns, rank=rank, alpha=alpha, seed=seed)
    rng = np.random.default_rng(seed)
    set_lora_state(model, {k: np.asarray(v) + (0.3 * rng.standard_normal(v.shape).astype(np.float32)
                                               if k.endswith("lora_B") else 0) for k, v in lora_state(model).items()})
    return model


def _load_in_diffusers(pipe, path, inputs):
    pipe.load_lora_weights(str(path), adapter_name="t")
    try:
        return _torch_out(pipe.transformer, inputs)
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("alpha", [4.0, 12.0], ids=["alpha=rank", "alpha!=rank"])
def test_diffusers_export_matches_diffusers_loader(base_model, pipe, inputs, tmp_path, alpha):
    model = _adapted(base_model, WIDE, alpha)
    path = L.save_lora_file(tmp_path / "pytorch_lora_weights.safetensors", lora_state(model), alpha)
    with safe_open(str(path), "np") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("transformer.transformer_blocks.1.attn.to_q.lora_A.weight").shape == (4, 32)
        assert f.get_tensor("transformer.norm_out.linear.lora_B.weight").shape == (64, 4)
    assert all(k.startswith("transformer.") for k in keys)
    adapter_meta = json.loads(meta["lora_adapter_metadata"])
    assert adapter_meta["transformer.r"] == 4 and adapter_meta["transformer.lora_alpha"] == alpha
    base = _torch_out(pipe.transformer, inputs)
    assert_adapter_close(_jax_out(model, inputs), _load_in_diffusers(pipe, path, inputs), 1e-4, base)


@pytest.mark.parametrize("alpha", [4.0, 12.0], ids=["alpha=rank", "alpha!=rank"])
def test_kohya_export_matches_diffusers_kohya_conversion(base_model, pipe, inputs, tmp_path, alpha):
    model = _adapted(base_model, KOHYA, alpha)
    path = L.save_lora_file(tmp_path / "kohya.safetensors", lora_state(model), alpha, format="kohya")
    with safe_open(str(path), "np") as f:
        keys = set(f.keys())
        assert "lora_adapter_metadata" not in f.metadata()
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").shape == (12, 32)
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight").shape == (96, 12)
        assert float(f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")) == alpha * 3
    assert {"lora_unet_single_blocks_1_linear2.alpha", "lora_unet_double_blocks_1_txt_mod_lin.lora_up.weight"} <= keys
    assert_close(_jax_out(model, inputs), _load_in_diffusers(pipe, path, inputs), 1e-4)


@pytest.mark.parametrize("parts", [("attn.to_q", "attn.to_k", "attn.to_v"),
                                   ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ("attn.to_k",)])
def test_kohya_fused_linear1_matches_diffusers_converter(parts):
    """Single-block linear1 (q|k|v|mlp fused) at Flux-dev sizes, through diffusers' own kohya converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    rng = np.random.default_rng(0)
    outs = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288}
    ours = {f"single_transformer_blocks.0.{p}": L.Adapter(rng.standard_normal((2, 8)).astype(np.float32),
                                                          rng.standard_normal((outs[p], 2)).astype(np.float32), 6.0)
            for p in parts}
    ours["transformer_blocks.0.attn.to_k"] = L.Adapter(rng.standard_normal((2, 8)).astype(np.float32),
                                                        rng.standard_normal((3072, 2)).astype(np.float32), 6.0)
    tensors, _ = K.to_kohya(ours)
    converted = _convert_kohya_flux_lora_to_diffusers({k: torch.from_numpy(v) for k, v in tensors.items()})
    got = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in converted if "lora_A" in k}
    assert set(ours) <= got
    for name in got:
        a = converted[f"transformer.{name}.lora_A.weight"].numpy().astype(np.float64)
        b = converted[f"transformer.{name}.lora_B.weight"].numpy().astype(np.float64)
        want = ours[name].delta() if name in ours else 0.0  # parts we did not adapt come back as zero
        np.testing.assert_allclose(b @ a, want, rtol=1e-5, atol=1e-4)
    assert K.from_kohya(tensors, "mem").keys() == ours.keys()  # our import drops the zero filler blocks


def test_kohya_import_matches_diffusers_converter_dense_fused():
    """Third-party kohya files: fused q|k|v (and q|k|v|mlp) with a dense lora_up, alpha != rank."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    rng = np.random.default_rng(1)
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": rng.standard_normal((4, 8)),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": rng.standard_normal((3 * 24, 4)),
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": np.asarray(2.0),
             "lora_unet_single_blocks_0_linear1.lora_down.weight": rng.standard_normal((3, 8)),
             "lora_unet_single_blocks_0_linear1.lora_up.weight": rng.standard_normal((21504, 3)),
             "lora_unet_single_blocks_0_linear1.alpha": np.asarray(5.0),
             "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": rng.standard_normal((4, 8)),
             "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": rng.standard_normal((16, 4)),
             "lora_unet_final_layer_adaLN_modulation_1.alpha": np.asarray(4.0)}
    kohya = {k: v.astype(np.float32) for k, v in kohya.items()}
    ref = _convert_kohya_flux_lora_to_diffusers({k: torch.from_numpy(v) for k, v in kohya.items()})
    ours = K.from_kohya(kohya, "mem")
    ref_modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in ref}
    assert set(ours) == ref_modules
    for name, ad in ours.items():
        pre = "transformer." if f"transformer.{name}.lora_A.weight" in ref else ""  # final layer: no prefix
        want = (ref[f"{pre}{name}.lora_B.weight"].double() @ ref[f"{pre}{name}.lora_A.weight"].double()).numpy()
        np.testing.assert_allclose(ad.delta(), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_stack_mixed_ranks_keeps_every_delta():
    rng = np.random.default_rng(2)
    ads = {"transformer_blocks.0.attn.to_q": L.Adapter(rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), 1.0),
           "transformer_blocks.1.attn.to_q": L.Adapter(rng.standard_normal((4, 6)), rng.standard_normal((5, 4)), 8.0),
           "proj_out": L.Adapter(rng.standard_normal((4, 3)), rng.standard_normal((7, 4)), 8.0)}
    flat, rank, alpha = L.stack(ads, {"transformer_blocks": 3})
    assert rank == 4 and alpha == 8.0 and flat["transformer_blocks.attn.to_q.lora_A"].shape == (3, 6, 4)
    back = L.unstack(flat, alpha)
    assert not back["transformer_blocks.2.attn.to_q"].delta().any()  # layer without adapter: zeros
    for name, ad in ads.items():
        np.testing.assert_allclose(back[name].delta(), ad.delta(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_round_trip_export_import_export_identical(base_model, tmp_path, fmt):
    model = _adapted(base_model, WIDE if fmt == "diffusers" else WIDE[:-1] + [r"norm1\.linear"], 8.0)
    first = L.save_lora_file(tmp_path / "a.safetensors", lora_state(model), 8.0, format=fmt)
    flat, meta = L.load_lora_file(first, layer_counts(model))
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["format"] == fmt
    assert meta["targets"] == sorted(lora_modules(model))
    for k, v in lora_state(model).items():
        assert np.array_equal(flat[k], np.asarray(v)), k
    second = L.save_lora_file(tmp_path / "b.safetensors", flat, meta["alpha"], format=fmt)
    with safe_open(str(first), "np") as f, safe_open(str(second), "np") as g:  # (header key order is not fixed)
        assert f.metadata() == g.metadata() and sorted(f.keys()) == sorted(g.keys())
        for k in f.keys():
            a, b = f.get_tensor(k), g.get_tensor(k)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
    if fmt == "kohya":  # ComfyUI spelling of the same file: diffusion_model.<bfl module>.lora_down.weight
        tails = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
                 "txt_attn_proj": "txt_attn.proj", "img_mlp_0": "img_mlp.0", "img_mlp_2": "img_mlp.2",
                 "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2", "img_mod_lin": "img_mod.lin",
                 "txt_mod_lin": "txt_mod.lin", "linear1": "linear1", "linear2": "linear2",
                 "modulation_lin": "modulation.lin"}
        with safe_open(str(first), "np") as f:
            comfy = {}
            for k in f.keys():
                base, _, suffix = k.partition(".")
                m = re.fullmatch(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)", base)
                base = (f"{m.group(1)}.{m.group(2)}.{tails[m.group(3)]}" if m else
                        {"lora_unet_final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}[base])
                comfy[f"diffusion_model.{base}.{suffix}"] = f.get_tensor(k)
        assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in comfy
        save_file(comfy, str(tmp_path / "comfy.safetensors"))
        again, _ = L.load_lora_file(tmp_path / "comfy.safetensors", layer_counts(model))
        assert again.keys() == flat.keys() and all(np.array_equal(again[k], flat[k]) for k in flat)


def _deltas(model) -> dict[str, np.ndarray]:
    """Effective ``scale * A @ B`` per adapted module (stacked: per layer)."""
    return {n: np.asarray(m.lora_A[...] @ m.lora_B[...]) * m.lora_scale for n, m in lora_modules(model).items()}


def test_import_peft_lora_saved_by_diffusers(base_model, pipe, inputs, tmp_path, tiny_pipeline_dir):
    """A LoRA written by diffusers' save_lora_weights (PEFT layout, alpha != rank) loads into the JAX model."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    ref = FluxTransformer2DModel.from_pretrained(tiny_pipeline_dir / "transformer", torch_dtype=torch.float32)
    targets = ["to_q", "to_v", "add_k_proj", "proj_out", "ff.net.0.proj"]
    ref.add_adapter(PeftLoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False))
    FluxKontextPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                          transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    want = _torch_out(ref, inputs)
    model = nnx.clone(base_model)
    meta = attach_lora(model, tmp_path / "pytorch_lora_weights.safetensors")
    assert meta["rank"] == 3 and meta["alpha"] == 5.0 and "proj_out" in meta["targets"]
    assert lora_metadata(model)["rank"] == 3
    assert_adapter_close(_jax_out(model, inputs), want, 1e-4, _torch_out(pipe.transformer, inputs))
    # strength: diffusers' set_adapters weight == our scale
    pipe.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"), adapter_name="s")
    pipe.set_adapters(["s"], [0.5])
    half = _torch_out(pipe.transformer, inputs)
    pipe.unload_lora_weights()
    model = nnx.clone(base_model)
    attach_lora(model, tmp_path / "pytorch_lora_weights.safetensors", scale=0.5)
    assert_close(_jax_out(model, inputs), half, 1e-4)


def test_init_lora_from_file_infers_targets_and_rank(base_model, tmp_path):
    src = _adapted(base_model, KOHYA, 2.0, rank=2)
    path = L.save_lora_file(tmp_path / "k.safetensors", lora_state(src), 2.0, format="kohya")
    model = nnx.clone(base_model)
    targets = tuple(attach_lora(model, config=LoraConfig(rank=16, alpha=16.0, init_from=str(path)))["targets"])
    assert targets == tuple(sorted(lora_modules(src))) and lora_metadata(model)["rank"] == 2
    want = _deltas(src)
    for name, d in _deltas(model).items():
        np.testing.assert_allclose(d, want[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # a model already adapted with the same modules/rank but another alpha: the file's scale is folded in
    other = nnx.clone(base_model)
    apply_lora(other, KOHYA, rank=2, alpha=8.0)
    attach_lora(other, path)
    for name, d in _deltas(other).items():
        np.testing.assert_allclose(d, want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_bad_files_and_mismatches(base_model, tmp_path):
    model = _adapted(base_model, [r"attn\.to_q"], 4.0)
    good = L.save_lora_file(tmp_path / "good.safetensors", lora_state(model), 4.0)
    with safe_open(str(good), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "transformer.foo.lora_C.weight": np.zeros(2, np.float32),
               "text_encoder.x.lora_A.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(L.LoraFileError, match=r"unsupported LoRA keys .*text_encoder\.x\.lora_A\.weight.*foo\.lora_C"):
        L.load_lora_file(tmp_path / "unknown.safetensors")
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": np.zeros((3, 32), np.float32),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": np.zeros((96, 3), np.float32),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((3, 8), np.float32)}
    save_file(kohya, str(tmp_path / "te.safetensors"))
    with pytest.raises(L.LoraFileError, match=r"lora_te1_text_model_encoder_layers_0_mlp_fc1\.lora_down\.weight"):
        L.load_lora_file(tmp_path / "te.safetensors")
    deep = {k.replace("transformer_blocks.1.", "transformer_blocks.5."): v for k, v in tensors.items()}
    save_file(deep, str(tmp_path / "deep.safetensors"))
    with pytest.raises(L.LoraFileError, match=r"transformer_blocks\.5\.attn\.to_q but the model has only 2"):
        attach_lora(nnx.clone(base_model), tmp_path / "deep.safetensors")
    renamed = {k.replace("to_q", "to_zz"): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    not_linear = r"not Linear modules of the model: .*single_transformer_blocks\.attn\.to_zz"
    with pytest.raises(L.LoraFileError, match=not_linear):
        attach_lora(nnx.clone(base_model), tmp_path / "renamed.safetensors")
    other = nnx.clone(base_model)
    apply_lora(other, [r"attn\.to_k"], rank=4, alpha=4.0)
    with pytest.raises(L.LoraFileError, match=r"not in the file \['single_transformer_blocks\.attn\.to_k'"):
        attach_lora(other, good)
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:100])
    with pytest.raises(L.LoraFileError, match="trunc.safetensors: not a readable safetensors file"):
        L.load_lora_file(tmp_path / "trunc.safetensors")
    # one hierarchy: a handler of the adapter errors (lora.LoraError) also catches the file errors
    from dreamomni2_jax.lora.layers import LoraError

    with pytest.raises(LoraError, match="missing.safetensors does not exist"):
        attach_lora(nnx.clone(base_model), tmp_path / "missing.safetensors")
    with pytest.raises(LoraError, match="model already has LoRA adapters"):
        apply_lora(other, [r"attn\.to_q"], rank=4, alpha=4.0)


def test_export_cli_from_checkpoint(base_model, tmp_path):
    model = _adapted(base_model, WIDE, 8.0)
    ck = C.open_run(tmp_path / "run", None, every_steps=1, adapter=lora_metadata(model))
    ck.save(7, {"step": jnp.asarray(7), "lora": nnx.state(model, LoRAParam), "opt_state": {"mu": jnp.zeros(3)}},
            {"pos": 7}, None)
    ck.close()
    restored = nnx.clone(base_model)  # checkpoint -> model directly (what the sampler does with a run folder)
    attach_lora(restored, tmp_path / "run")
    want = _deltas(model)
    got = _deltas(restored)
    assert got.keys() == want.keys() and all(np.array_equal(d, want[n]) for n, d in got.items())
    out = tmp_path / "export.safetensors"
    assert export_main(["--ckpt", str(tmp_path / "run"), "--out", str(out), "--dtype", "fp32"]) == 0
    direct = L.save_lora_file(tmp_path / "direct.safetensors", lora_state(model), 8.0)
    with safe_open(str(out), "np") as f, safe_open(str(direct), "np") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert all(np.array_equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
        assert f.metadata()["lora_adapter_metadata"] == g.metadata()["lora_adapter_metadata"]
    bf = tmp_path / "bf16.safetensors"
    assert export_main(["--ckpt", str(tmp_path / "run" / "checkpoints" / "7"), "--out", str(bf), "--format",
                        "kohya"]) == 0
    with safe_open(str(bf), "np") as f:
        assert str(f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight").dtype) == "bfloat16"
    assert export_main(["--ckpt", str(tmp_path / "run"), "--step", "3", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
