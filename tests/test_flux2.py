"""FLUX.2 transformer (Flax NNX) vs diffusers ``Flux2Transformer2DModel`` on tiny random checkpoints, through our
converter (diffusers folder and BFL single file)."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from support.asserts import rel_err
from dreamomni2_jax.convert.flux2_transformer import main as convert_main
from dreamomni2_jax.weights.store import ConversionError
from dreamomni2_jax.layout import ids_klein as P2
from dreamomni2_jax.models.flux2 import Flux2Config
from dreamomni2_jax.convert.loaders import load_flux2
from dreamomni2_jax.layout.ids_flux1 import SampleLayout
from dreamomni2_jax.testing.tiny_klein import FLUX2_TINY, save_flux2_transformer
from support.fixtures_klein import meta_reader

TXT = 7
LAYOUT = SampleLayout(target=(4, 6), references=((4, 4), (2, 6)))


def _inputs(cfg: Flux2Config, seed: int, layout=LAYOUT, batch: int = 2):
    rng = np.random.default_rng(seed)
    n = layout.target_tokens + layout.reference_tokens
    return dict(
        hidden_states=rng.standard_normal((batch, n, cfg.in_channels), np.float32),
        encoder_hidden_states=rng.standard_normal((batch, TXT, cfg.joint_attention_dim), np.float32),
        timestep=rng.uniform(0, 1, batch).astype(np.float32),
        img_ids=P2.sample_ids(layout),
        txt_ids=P2.text_ids(TXT),
        guidance=np.full(batch, 3.5, np.float32) if cfg.guidance_embeds else None,
    )


def _torch_model(src):
    from diffusers import Flux2Transformer2DModel as TorchFlux2

    return TorchFlux2.from_pretrained(src, torch_dtype=torch.float32).eval()


def _reference(model, inputs):
    kw = {k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**kw, return_dict=False)[0].numpy()


@nnx.jit(static_argnames=("n_out",))
def _forward(model, inputs, n_out=None):
    return model(**inputs, n_out=n_out)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """Tiny klein-shaped transformer (no guidance) -> converted fp32 folder."""
    src = save_flux2_transformer(tmp_path_factory.mktemp("flux2") / "transformer", seed=0)
    out = src.parent / "converted"
    assert convert_main(["--src", str(src), "--out", str(out), "--dtype", "fp32", "--no-progress"]) == 0
    return src, out, _torch_model(src)


@pytest.fixture(scope="module")
def dev_shaped(tmp_path_factory):
    """FLUX.2 [dev]-shaped config (guidance embedder, 3 double + 1 single block, other mlp ratio and theta)."""
    src = save_flux2_transformer(tmp_path_factory.mktemp("flux2dev") / "transformer", seed=5, guidance_embeds=True,
                                 num_layers=3, num_single_layers=1, mlp_ratio=2.0, rope_theta=10000)
    return src, _torch_model(src)


def test_klein_parity_fp32(klein):
    src, out, ref = klein
    model = load_flux2(out, dtype=jnp.float32)
    assert model.config == Flux2Config.from_json(src / "config.json")
    assert json.loads((out / "config.json").read_text())["_class_name"] == "Flux2Transformer2DModel"
    for seed, layout in ((0, LAYOUT), (1, SampleLayout(target=(6, 4), references=((2, 2), (4, 8), (2, 4))))):
        inputs = _inputs(model.config, seed, layout)
        want = _reference(ref, inputs)
        got = _forward(model, inputs)
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-4
        if seed:
            continue
        # n_out: only the target rows are computed by the last block, same values.
        n = layout.target_tokens
        np.testing.assert_allclose(np.asarray(_forward(model, inputs, n_out=n)), np.asarray(got)[:, :n],
                                   rtol=0, atol=1e-5 * np.abs(want).max())


def test_dev_shaped_parity_on_the_fly_with_remat_and_blocked_attention(dev_shaped):
    src, ref = dev_shaped
    for remat, impl in (("none", "xla"), ("full", "blocked")):
        model = load_flux2(src, dtype=jnp.float32, remat=remat, attention_impl=impl)  # converted in memory
        assert model.config.guidance_embeds and model.config.mlp_ratio == 2.0
        inputs = _inputs(model.config, 3)
        assert rel_err(_forward(model, inputs), _reference(ref, inputs)) <= 1e-4
    with pytest.raises(ValueError, match="guidance"):
        model(**{**inputs, "guidance": None})


def test_padding_mask_keeps_real_tokens_exact(klein):
    """A padded reference section (mask False) leaves the real tokens' outputs equal to the unpadded run."""
    _, out, ref = klein
    model = load_flux2(out, dtype=jnp.float32)
    inputs = _inputs(model.config, 4, batch=1)
    want = _reference(ref, inputs)
    n = inputs["hidden_states"].shape[1]
    pad = 5
    padded = dict(inputs)
    padded["hidden_states"] = np.concatenate([inputs["hidden_states"], np.ones((1, pad, 16), np.float32)], 1)
    padded["img_ids"] = np.concatenate([inputs["img_ids"], np.zeros((pad, 4), np.int32)])
    mask = np.concatenate([np.ones((1, n), bool), np.zeros((1, pad), bool)], 1)
    got = _forward(model, {**padded, "attention_mask": mask})[:, :n]
    assert rel_err(got, want) <= 1e-4


def test_bfl_single_file_parity(klein, tmp_path):
    """BFL layout written by inverting diffusers' own single-file converter, checked against that converter."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file

    src, _, ref = klein
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    bfl = _to_bfl(sd, FLUX2_TINY["num_layers"], FLUX2_TINY["num_single_layers"])
    back = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in bfl.items()})
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}, str(path))
    out = tmp_path / "converted"
    assert convert_main(["--src", str(path), "--out", str(out), "--dtype", "fp32", "--no-progress",
                         "--config", str(src / "config.json")]) == 0
    model = load_flux2(out, dtype=jnp.float32)
    inputs = _inputs(model.config, 6)
    assert rel_err(_forward(model, inputs), _reference(ref, inputs)) <= 1e-4
    # shape inference alone (default head_dim 128 does not fit this tiny model) fails with one clear message
    with pytest.raises(ValueError, match="head_dim"):
        load_flux2(path, dtype=jnp.float32)


def test_converter_reports_every_problem(klein, tmp_path):
    from safetensors.torch import load_file, save_file

    src = klein[0]
    files = sorted(src.glob("*.safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    sd.pop("transformer_blocks.1.ff.linear_in.weight")
    sd["single_transformer_blocks.0.attn.to_out.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    (bad / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ConversionError) as e:
        load_flux2(bad, dtype=jnp.float32)
    msg = str(e.value)
    for needle in ("transformer_blocks.1.ff.linear_in.weight", "single_transformer_blocks.0.attn.to_out.weight",
                   "extra.weight"):
        assert needle in msg


def _to_bfl(sd: dict, n_double: int, n_single: int) -> dict:
    """Inverse of diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers`` (checked by the test above)."""
    out = {}
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
           "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
           "single_stream_modulation.linear": "single_stream_modulation.lin"}
    for k, v in top.items():
        if f"{k}.weight" in sd:
            out[f"{v}.weight"] = sd[f"{k}.weight"]
    scale, shift = sd["norm_out.linear.weight"].chunk(2, 0)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], 0)
    dmap = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
            "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
            "attn.to_out.0.weight": "img_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
            "ff.linear_out.weight": "img_mlp.2.weight",
            "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
            "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
            "attn.to_add_out.weight": "txt_attn.proj.weight",
            "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight"}
    for i in range(n_double):
        d = f"transformer_blocks.{i}."
        for k, v in dmap.items():
            out[f"double_blocks.{i}.{v}"] = sd[d + k]
        out[f"double_blocks.{i}.img_attn.qkv.weight"] = torch.cat([sd[d + f"attn.to_{m}.weight"] for m in "qkv"])
        out[f"double_blocks.{i}.txt_attn.qkv.weight"] = torch.cat([sd[d + f"attn.add_{m}_proj.weight"] for m in "qkv"])
    smap = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
            "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
    for j in range(n_single):
        for k, v in smap.items():
            out[f"single_blocks.{j}.{v}"] = sd[f"single_transformer_blocks.{j}.{k}"]
    return out


@pytest.mark.parametrize("name", ["klein-4b", "klein-9b", "dev"])
def test_published_configs_match_diffusers_modules_at_full_size(name):
    """Every tensor of the full-size diffusers model (meta device) maps onto our model, shapes checked; BFL too."""
    from diffusers import Flux2Transformer2DModel as TorchFlux2

    from dreamomni2_jax.convert.flux2_transformer import make_plan
    from dreamomni2_jax.models.flux2 import FLUX2_PRESETS

    cfg = FLUX2_PRESETS[name]
    with torch.device("meta"):
        ref = TorchFlux2(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    plan = make_plan(meta_reader(ref), "diffusers", cfg)  # raises ConversionError listing any mismatch
    n_ref = sum(p.numel() for p in ref.parameters())
    assert plan.num_sources == len(ref.state_dict())
    print(f"{name}: {n_ref / 1e9:.2f} B params")
    if name == "klein-4b":
        assert 3.5e9 < n_ref < 4.5e9


@pytest.mark.parametrize("model", ["flux", "flux2"])
def test_bench_convert_rss_folder_matches_diffusers_model(model):
    """The random folder of ``scripts/bench_convert_rss.py`` has exactly the diffusers model's keys and shapes."""
    import importlib.util
    from pathlib import Path

    import diffusers

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_convert_rss.py"
    spec = importlib.util.spec_from_file_location("_bench_convert_rss", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m = bench.MODELS[model]
    width, n_double, n_single = m["defaults"]
    cfg = m["config"](width, n_double, n_single)
    cls = getattr(diffusers, cfg.pop("_class_name"))
    with torch.device("meta"):
        ref = cls(**cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert m["shapes"](width, n_double, n_single) == want
