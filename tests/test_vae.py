"""VAE: parity with diffusers AutoencoderKL (diffusers and BFL checkpoints), chunking, converter errors."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from support.asserts import assert_close
from dreamomni2_jax.convert import vae as cvae
from dreamomni2_jax.weights.safetensors_io import open_checkpoint, save_arrays
from dreamomni2_jax.weights.store import ConversionError
from dreamomni2_jax.convert.loaders import load_vae
from dreamomni2_jax.models.vae import (
    VAEConfig, decode_latents, denormalize_latents, encode_images, normalize_latents,
)

TOL = 1e-4


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def ref_vae(tiny_pipeline_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_pipeline_dir / "vae", torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    cvae.main(["--src", str(tiny_pipeline_dir / "vae"), "--out", str(out), "--no-progress"])
    return out


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 48, generator=g) * 2 - 1  # non-square, 4x6 latent


def _check_parity(vae, ref_vae, images):
    """Jitted encode (mode) and decode against diffusers; batch of 2 in one chunk (one compile each)."""
    with torch.no_grad():
        mode = ref_vae.encode(images).latent_dist.mode()
        dec = ref_vae.decode(mode).sample
    assert_close(_nchw(encode_images(vae, _nhwc(images), batch_chunk=2)), mode.numpy(), TOL)
    assert_close(_nchw(decode_latents(vae, _nhwc(mode.numpy()), batch_chunk=2)), dec.numpy(), TOL)


def test_encode_decode_match_diffusers(converted, ref_vae, images):
    vae = load_vae(converted, jnp.float32)
    assert json.loads((converted / "config.json").read_text())["latent_channels"] == 4
    _check_parity(vae, ref_vae, images)


def test_on_the_fly_load_from_diffusers_folder(tiny_pipeline_dir, ref_vae, images):
    _check_parity(load_vae(tiny_pipeline_dir / "vae", jnp.float32), ref_vae, images)


def test_latent_normalization_matches_kontext_formula(tiny_pipeline_dir):
    cfg = VAEConfig.from_json(tiny_pipeline_dir / "vae" / "config.json")
    raw = json.loads((tiny_pipeline_dir / "vae" / "config.json").read_text())
    z = np.random.default_rng(0).normal(size=(1, 2, 2, 4)).astype(np.float32)
    # diffusers FluxKontextPipeline: (latents - shift_factor) * scaling_factor, decode: latents / scale + shift
    np.testing.assert_allclose(normalize_latents(z, cfg), (z - raw["shift_factor"]) * raw["scaling_factor"], rtol=1e-6)
    np.testing.assert_allclose(denormalize_latents(normalize_latents(z, cfg), cfg), z, rtol=1e-5, atol=1e-6)


def test_chunked_encode_decode_equal_plain(converted, images):
    """Per-image batch chunks + query-chunked attention == one plain call (up to float reassociation)."""
    vae = load_vae(converted, jnp.float32)
    small = load_vae(converted, jnp.float32, attn_chunk=5)  # 4x6 latent = 24 tokens -> 5 query chunks
    x = _nhwc(images)
    plain = encode_images(vae, x, batch_chunk=2)
    chunked = encode_images(small, x, batch_chunk=1)
    assert chunked.shape == plain.shape == (2, 4, 6, 4)
    assert float(jnp.abs(chunked - plain).max()) <= 1e-5 * float(jnp.abs(plain).max())
    dec = decode_latents(vae, plain, batch_chunk=2)
    dec_chunked = decode_latents(small, plain, batch_chunk=1)
    assert float(jnp.abs(dec_chunked - dec).max()) <= 1e-5 * float(jnp.abs(dec).max())
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(x[:, :30])


def _write_bfl(diffusers_vae_dir, cfg, path):
    """Re-save the diffusers weights under BFL / LDM names (attention projections as 1x1 convs)."""
    reader = open_checkpoint(diffusers_vae_dir)
    tensors = {}
    for mod, kind in cvae.vae_modules(cfg):
        for leaf in ("weight", "bias"):
            a = reader.read(f"{mod}.{leaf}")
            if kind == "linear" and leaf == "weight":
                a = a[:, :, None, None]
            tensors[f"{cvae.bfl_name(mod, len(cfg.block_out_channels))}.{leaf}"] = a
    save_arrays(path, tensors)
    return tensors


def test_bfl_checkpoint(tiny_pipeline_dir, ref_vae, images, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg_path = tiny_pipeline_dir / "vae" / "config.json"
    cfg = VAEConfig.from_json(cfg_path)
    bfl = _write_bfl(tiny_pipeline_dir / "vae", cfg, tmp_path / "ae.safetensors")
    # The BFL names we map from are the ones diffusers' own single-file loader maps to its keys.
    back = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in bfl.items()},
                                      json.loads(cfg_path.read_text()))
    ref_sd = ref_vae.state_dict()
    assert sorted(back) == sorted(ref_sd)
    for k, v in back.items():
        torch.testing.assert_close(v, ref_sd[k], rtol=0, atol=0)
    # Shape-inferred config agrees with diffusers' except the two fields BFL files cannot carry.
    inferred = cvae.infer_bfl_config(open_checkpoint(tmp_path / "ae.safetensors"), norm_num_groups=4)
    for f in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
              "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        assert getattr(inferred, f) == getattr(cfg, f), f
    assert (inferred.scaling_factor, inferred.shift_factor) == (0.3611, 0.1159)
    out = cvae.convert(tmp_path / "ae.safetensors", tmp_path / "out", config=cfg_path, progress=False)
    _check_parity(load_vae(out, jnp.float32), ref_vae, images)


def test_bad_inputs(tiny_pipeline_dir, tmp_path):
    src = tmp_path / "vae"
    shutil.copytree(tiny_pipeline_dir / "vae", src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(ValueError, match=r"config\.json: _class_name is 'AutoencoderTiny'"):
        cvae.build_plan(src)
    (src / "config.json").write_text(json.dumps({**cfg, "layers_per_block": 2}))
    with pytest.raises(ConversionError, match=r"missing key encoder\.down_blocks\.0\.resnets\.1\.conv1\.weight"):
        cvae.build_plan(src)
    (src / "config.json").write_text(json.dumps({**cfg, "up_block_types": ["AttnUpDecoderBlock2D"] * 4}))
    with pytest.raises(ValueError, match="up_block_types"):
        cvae.build_plan(src)
    with pytest.raises(FileExistsError):
        cvae.convert(tiny_pipeline_dir / "vae", src, progress=False)
