"""Flux weight converter: CLI, BFL single-file layout, validation errors, atomic output (sharded restore on 8
devices: tests/multidevice/test_restore_sharded.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from support import reference_code
from support.asserts import assert_close
from dreamomni2_jax.convert import flux_transformer as fc
from dreamomni2_jax.weights.safetensors_io import SafetensorsError, open_checkpoint, save_arrays
from dreamomni2_jax.weights.store import ConversionError, write_checkpoint
from dreamomni2_jax.layout import ids_flux1 as P
from dreamomni2_jax.testing import tiny_flux1 as tiny
from dreamomni2_jax.models.flux import FluxConfig
from dreamomni2_jax.convert.loaders import load_flux

REPO = Path(__file__).resolve().parents[1]
TINY = FluxConfig.from_dict(tiny.FLUX_TINY)
INNER, HEAD_DIM = TINY.num_attention_heads * TINY.attention_head_dim, TINY.attention_head_dim
MLP = int(INNER * 4.0)  # Flux's mlp_ratio
TIME = 256  # sinusoidal timestep / guidance embedding width (fixed by the architecture)


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _read_all(src: Path) -> dict[str, np.ndarray]:
    reader = open_checkpoint(src)
    return {k: reader.read(k) for k in reader.keys()}


@pytest.fixture(scope="module")
def transformer_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir / "transformer"


@pytest.fixture(scope="module")
def cli_out(transformer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "flux"
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "flux_transformer.py"), "--src", str(transformer_dir),
                           "--out", str(out), "--dtype", "bf16"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_cli_output_and_in_memory_load_agree(cli_out, transformer_dir):
    assert sorted(p.name for p in cli_out.parent.iterdir()) == ["flux"]  # no temp folders left behind
    meta = json.loads((cli_out / "config.json").read_text())
    assert meta["_dtype"] == "bf16"
    assert FluxConfig.from_dict(meta) == FluxConfig.from_json(transformer_dir / "config.json")
    converted = _params(load_flux(cli_out, dtype=jnp.float32))
    direct = _params(load_flux(transformer_dir, dtype=jnp.float32))  # SRC converted on the fly, nothing written
    assert converted.keys() == direct.keys()
    src = _read_all(transformer_dir)
    np.testing.assert_array_equal(direct["x_embedder.kernel"], src["x_embedder.weight"].T)
    np.testing.assert_array_equal(direct["single_transformer_blocks.proj_out.kernel"][1],
                                  src["single_transformer_blocks.1.proj_out.weight"].T)
    for k, v in direct.items():  # OUT is bf16-rounded, except the (float32) norm scales
        want = v if k.endswith(".scale") else v.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(converted[k], want, err_msg=k)


# ------------------------------------------------------------------------------------------------ BFL layout
def _bfl_state_dict(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"img_in": (INNER, TINY.in_channels), "txt_in": (INNER, TINY.joint_attention_dim),
              "time_in.in_layer": (INNER, TIME), "time_in.out_layer": (INNER, INNER),
              "vector_in.in_layer": (INNER, TINY.pooled_projection_dim), "vector_in.out_layer": (INNER, INNER),
              "guidance_in.in_layer": (INNER, TIME), "guidance_in.out_layer": (INNER, INNER),
              "final_layer.linear": (TINY.out_dim, INNER), "final_layer.adaLN_modulation.1": (2 * INNER, INNER)}
    for i in range(TINY.num_layers):
        for s in ("img", "txt"):
            shapes.update({f"double_blocks.{i}.{s}_mod.lin": (6 * INNER, INNER),
                           f"double_blocks.{i}.{s}_attn.qkv": (3 * INNER, INNER),
                           f"double_blocks.{i}.{s}_attn.proj": (INNER, INNER),
                           f"double_blocks.{i}.{s}_mlp.0": (MLP, INNER), f"double_blocks.{i}.{s}_mlp.2": (INNER, MLP)})
    for i in range(TINY.num_single_layers):
        shapes.update({f"single_blocks.{i}.linear1": (3 * INNER + MLP, INNER),
                       f"single_blocks.{i}.linear2": (INNER, INNER + MLP),
                       f"single_blocks.{i}.modulation.lin": (3 * INNER, INNER)})
    sd = {}
    for name, shape in shapes.items():
        sd[f"{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(shape[0])).astype(np.float32)
    norms = [f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale" for i in range(TINY.num_layers)
             for s in ("img", "txt") for q in ("query", "key")] + \
        [f"single_blocks.{i}.norm.{q}_norm.scale" for i in range(TINY.num_single_layers) for q in ("query", "key")]
    sd.update({n: (1 + 0.1 * rng.standard_normal(HEAD_DIM)).astype(np.float32) for n in norms})
    return {f"model.diffusion_model.{k}": v for k, v in sd.items()}  # prefix as in some single-file exports


def test_bfl_reference_transcription_matches_diffusers():
    """The transcription (width a parameter) equals diffusers' function at its hard-coded width 3072: a BFL
    checkpoint whose weights have no input columns (nothing to allocate) but real rows and biases."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as theirs

    wide = 3072
    mlp = int(wide * 4.0)
    rows = {"img_in": wide, "txt_in": wide, "time_in.in_layer": wide, "time_in.out_layer": wide,
            "vector_in.in_layer": wide, "vector_in.out_layer": wide, "guidance_in.in_layer": wide,
            "guidance_in.out_layer": wide, "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * wide,
            **{f"double_blocks.0.{s}_{n}": r for s in ("img", "txt") for n, r in
               (("mod.lin", 6 * wide), ("attn.qkv", 3 * wide), ("attn.proj", wide), ("mlp.0", mlp), ("mlp.2", wide))},
            "single_blocks.0.linear1": 3 * wide + mlp, "single_blocks.0.linear2": wide,
            "single_blocks.0.modulation.lin": 3 * wide}
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, n in rows.items():
        sd[f"model.diffusion_model.{name}.weight"] = torch.empty(n, 0)
        sd[f"model.diffusion_model.{name}.bias"] = torch.randn(n, generator=gen)
    for q in ("query", "key"):
        for norm in ("double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0"):
            sd[f"model.diffusion_model.{norm}.norm.{q}_norm.scale"] = torch.randn(128, generator=gen)
    want = theirs(dict(sd))
    got = reference_code.convert_flux_transformer_checkpoint_to_diffusers(dict(sd), inner_dim=wide)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_bfl_single_file_matches_diffusers(tmp_path):
    from diffusers import FluxTransformer2DModel as TorchFlux

    sd = _bfl_state_dict(0)
    bfl_file = tmp_path / "flux1-kontext-tiny.safetensors"
    save_arrays(bfl_file, {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()})
    bf = _read_all(bfl_file)  # what both converters see (bf16 on disk, like the real release)
    ref_sd = reference_code.convert_flux_transformer_checkpoint_to_diffusers(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in bf.items()}, inner_dim=INNER)
    ref = TorchFlux(**tiny.FLUX_TINY).eval()
    ref.load_state_dict(ref_sd, strict=True)

    config = tmp_path / "config.json"  # tiny head_dim / rope axes are not inferable: pass them
    config.write_text(json.dumps({**tiny.FLUX_TINY}))
    inferred = fc.infer_config(open_checkpoint(bfl_file).under_prefix((fc.BFL_PREFIX,)), "bfl",
                               FluxConfig.from_json(config))
    assert inferred == FluxConfig.from_dict(tiny.FLUX_TINY)
    out = fc.convert(bfl_file, tmp_path / "out", dtype="fp32", config=config, progress=False)
    model = load_flux(out, dtype=jnp.float32)
    assert model.config == inferred

    rng = np.random.default_rng(1)
    layout = P.SampleLayout(target=(4, 4), references=((2, 6),))
    n = layout.target_tokens + layout.reference_tokens
    inputs = dict(hidden_states=rng.standard_normal((1, n, TINY.in_channels), np.float32),
                  encoder_hidden_states=rng.standard_normal((1, 5, TINY.joint_attention_dim), np.float32),
                  pooled_projections=rng.standard_normal((1, TINY.pooled_projection_dim), np.float32),
                  timestep=np.array([0.7], np.float32), img_ids=layout.ids(), txt_ids=P.text_ids(5),
                  guidance=np.array([2.5], np.float32))
    with torch.no_grad():
        want = ref(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, return_dict=False)[0].numpy()
    got = np.asarray(model(**inputs))
    assert_close(got, want, 1e-4)


def test_bfl_default_config_needs_head_dim_128(tmp_path):
    bfl_file = tmp_path / "tiny.safetensors"
    save_arrays(bfl_file, _bfl_state_dict(1))
    with pytest.raises(ValueError, match="not a multiple of head_dim 128; pass --config"):
        fc.build_plan(bfl_file)


# ---------------------------------------------------------------------------------------------- error paths
def test_missing_extra_and_misshaped_tensors_listed_in_one_error(transformer_dir, tmp_path):
    sd = _read_all(transformer_dir)
    del sd["transformer_blocks.1.attn.to_k.weight"]
    sd["transformer_blocks.0.attn.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["single_transformer_blocks.0.proj_mlp.weight"] = np.zeros((MLP - 1, INNER), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_arrays(bad / "diffusion_pytorch_model.safetensors", sd)
    (bad / "config.json").write_text((transformer_dir / "config.json").read_text())
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        fc.convert(bad, out, progress=False)
    msg, f = str(e.value), bad / "diffusion_pytorch_model.safetensors"
    assert "3 problem(s)" in msg
    assert "missing key transformer_blocks.1.attn.to_k.weight" in msg
    assert f"{f}: transformer_blocks.0.attn.extra.weight [3, 3] is not used by any rule" in msg
    want = f"expected shape [{MLP}, {INNER}], got [{MLP - 1}, {INNER}]"
    assert f"{f}: single_transformer_blocks.0.proj_mlp.weight: {want}" in msg
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_write_checkpoint_is_atomic(tmp_path):
    def items():
        yield "a.kernel", np.ones((2, 2), np.float32)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(tmp_path / "out", items(), {"x": 1}, group_bytes=1)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_checkpoint(tmp_path / "out", iter([]), {})


def test_safetensors_reader(tmp_path, transformer_dir):
    from safetensors.torch import save_file

    t = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": t, "i": torch.arange(4, dtype=torch.int64)}, str(tmp_path / "x.safetensors"))
    r = open_checkpoint(tmp_path / "x.safetensors")
    assert r.dtype("w") == ml_dtypes.bfloat16 and r.shape("w") == (3, 5)
    np.testing.assert_array_equal(r.read("w").astype(np.float32), t.float().numpy())
    np.testing.assert_array_equal(r.read("i"), np.arange(4))
    (tmp_path / "model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(SafetensorsError, match="never pickle"):
        open_checkpoint(tmp_path / "model.bin")
    # A sharded folder whose index points a key at the wrong shard.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in transformer_dir.iterdir():
        (sharded / f.name).write_bytes(f.read_bytes())
    index = next(sharded.glob("*.index.json"))
    meta = json.loads(index.read_text())
    key = "x_embedder.weight"
    other = next(v for v in sorted(set(meta["weight_map"].values())) if v != meta["weight_map"][key])
    meta["weight_map"][key] = other
    index.write_text(json.dumps(meta))
    with pytest.raises(SafetensorsError, match=f"{key} mapped to {other} but not in that file"):
        open_checkpoint(sharded)


def test_load_flux_accepts_relative_converted_path(tiny_converted_dir, monkeypatch):
    """Orbax refuses relative paths; users pass them (e.g. --model demo_out/model)."""
    from dreamomni2_jax.convert.loaders import load_flux

    monkeypatch.chdir(tiny_converted_dir.parent)
    model = load_flux(os.path.join(tiny_converted_dir.name, "transformer"), dtype=jnp.float32)
    assert model.config.num_layers >= 1
