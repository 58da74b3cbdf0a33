"""FLUX.2 VAE (Flax NNX) vs diffusers ``AutoencoderKLFlux2`` and the ``Flux2KleinPipeline`` latent normalisation,
on a tiny random checkpoint through our converter."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from support.asserts import rel_err
from dreamomni2_jax.weights.store import ConversionError
from dreamomni2_jax.convert.vae_flux2 import main as convert_main
from dreamomni2_jax.layout import ids_klein as P2
from dreamomni2_jax.models.vae_flux2 import Flux2VAEConfig, encode_tokens
from dreamomni2_jax.convert.loaders import load_vae_flux2
from dreamomni2_jax.testing.tiny_klein import save_flux2_vae


@pytest.fixture(scope="module")
def flux2_vae(tmp_path_factory):
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    src = save_flux2_vae(tmp_path_factory.mktemp("vae_flux2") / "vae", seed=1)
    out = src.parent / "converted"
    assert convert_main(["--src", str(src), "--out", str(out), "--no-progress"]) == 0
    ref = AutoencoderKLFlux2.from_pretrained(src, torch_dtype=torch.float32).eval()
    pipe = object.__new__(Flux2KleinPipeline)  # the latent helpers need only `vae`
    pipe.vae = ref
    return src, out, pipe, load_vae_flux2(out, dtype=jnp.float32)


def test_encode_tokens_match_klein_pipeline(flux2_vae):
    src, out, pipe, model = flux2_vae
    assert model.flux2_config == Flux2VAEConfig.from_json(src / "config.json")
    assert json.loads((out / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32)
    with torch.no_grad():
        want = pipe._pack_latents(pipe._encode_vae_image(torch.from_numpy(images), generator=None)).numpy()
    got = encode_tokens(model, jnp.asarray(images.transpose(0, 2, 3, 1)), batch_chunk=1)
    assert got.shape == want.shape == (2, 2 * 3, 16)
    assert rel_err(got, want) <= 1e-4
    np.testing.assert_array_equal(np.asarray(model.bn.running_var[...]), pipe.vae.bn.running_var.numpy())


def test_decode_tokens_match_klein_pipeline(flux2_vae):
    _, _, pipe, model = flux2_vae
    tokens = np.random.default_rng(1).standard_normal((2, 2 * 3, 16)).astype(np.float32)
    with torch.no_grad():  # the tail of Flux2KleinPipeline.__call__
        ids = torch.from_numpy(P2.target_ids(4, 6))[None].expand(2, -1, -1)
        lat = pipe._unpack_latents_with_ids(torch.from_numpy(tokens), ids, 2, 3)
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        want = pipe.vae.decode(pipe._unpatchify_latents(lat * std + mean), return_dict=False)[0].numpy()
    got = model.decode_tokens(jnp.asarray(tokens), 4, 6)
    assert rel_err(np.asarray(got).transpose(0, 3, 1, 2), want) <= 1e-4


def test_converter_checks_class_and_tensors(flux2_vae, tmp_path):
    from safetensors.torch import load_file, save_file

    src = flux2_vae[0]
    bad = tmp_path / "vae"
    bad.mkdir()
    sd = load_file(str(next(src.glob("*.safetensors"))))
    assert "bn.num_batches_tracked" in sd  # skipped on purpose
    del sd["bn.running_var"]
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="bn.running_var"):
        load_vae_flux2(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKLFlux2"):
        load_vae_flux2(bad)
    with pytest.raises(ValueError, match="decoder_block_out_channels"):
        Flux2VAEConfig.from_dict({**cfg, "decoder_block_out_channels": [8, 8, 16, 16]})


def _to_bfl(sd: dict, n_blocks: int) -> dict:
    """Inverse of diffusers' ``convert_flux2_vae_checkpoint_to_diffusers`` (checked by the test below)."""
    import re

    out = {}
    for key, v in sd.items():
        k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
        k = re.sub(r"^quant_conv\.", "encoder.quant_conv.", k)
        k = re.sub(r"^post_quant_conv\.", "decoder.post_quant_conv.", k)
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_blocks - 1 - int(m[1])}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_blocks - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = k.replace("conv_shortcut", "nin_shortcut")
        if ".mid_block.attentions.0." in k:
            k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            k = re.sub(r"\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", lambda m: "." + {
                "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[1]] + ".", k)
            if v.ndim == 2:  # BFL attention projections are 1x1 convs
                v = v[:, :, None, None]
        out[k] = v
    return out


def test_bfl_single_file_matches_diffusers_conversion(flux2_vae, tmp_path):
    """BFL FLUX.2 ``ae.safetensors`` layout written by inverting diffusers' conversion script (transcribed in
    ``support/reference_code.py``), converted by ours, checked against the diffusers model; config inferred from
    shapes."""
    from safetensors.torch import load_file, save_file

    from support.reference_code import convert_flux2_vae_checkpoint_to_diffusers
    from dreamomni2_jax.convert.vae_flux2 import infer_bfl_config
    from dreamomni2_jax.weights.safetensors_io import open_checkpoint

    src, _, pipe, _ = flux2_vae
    sd = {k: v.clone() for k, v in load_file(str(next(src.glob("*.safetensors")))).items()}
    cfg = json.loads((src / "config.json").read_text())
    bfl = _to_bfl(sd, len(cfg["block_out_channels"]))
    back = convert_flux2_vae_checkpoint_to_diffusers(dict(bfl), cfg)
    want_keys = sorted(k for k in sd if k != "bn.num_batches_tracked")
    assert sorted(back) == want_keys and all(torch.equal(back[k], sd[k]) for k in want_keys)
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(path))
    # structure inferred from shapes; GroupNorm groups (default 32) cannot be, and the tiny model uses fewer
    ref_cfg = Flux2VAEConfig.from_json(src / "config.json")
    assert infer_bfl_config(open_checkpoint(path), ref_cfg.norm_num_groups) == ref_cfg
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        load_vae_flux2(path)
    out = tmp_path / "converted"
    assert convert_main(["--src", str(path), "--out", str(out), "--dtype", "fp32", "--no-progress",
                         "--config", str(src / "config.json")]) == 0
    model = load_vae_flux2(out, dtype=jnp.float32)
    images = np.random.default_rng(2).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    latents = np.random.default_rng(3).standard_normal((1, ref_cfg.latent_channels, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = pipe._pack_latents(pipe._encode_vae_image(torch.from_numpy(images), generator=None)).numpy()
        dec = pipe.vae.decode(torch.from_numpy(latents), return_dict=False)[0].numpy()
    assert rel_err(encode_tokens(model, jnp.asarray(images.transpose(0, 2, 3, 1)), batch_chunk=1), want) <= 1e-4
    got = model.decode(jnp.asarray(latents.transpose(0, 2, 3, 1)))  # post_quant_conv + decoder
    assert rel_err(np.asarray(got).transpose(0, 3, 1, 2), dec) <= 1e-4
