"""Model schemas (``models/<model>_schema.py``) against the diffusers models they declare, and what derives from
them: LoRA presets (vs peft with diffusers' training-script targets), sharding axes (an undeclared Linear fails),
and the FLOP model (vs the dot products of a traced FLUX.2 LoRA step)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from support import reference_code as ref
from dreamomni2_jax.train import flops as perf
from dreamomni2_jax.layout import ids_klein as P2
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.config import ConfigError, LoraConfig
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.lora.layers import LoRAParam
from dreamomni2_jax.models.flux import FluxConfig, FluxTransformer2DModel
from dreamomni2_jax.models.flux2 import Flux2Config, Flux2Transformer2DModel
from dreamomni2_jax.models.roles import SchemaError
from dreamomni2_jax.models.schemas import SCHEMAS, lora_presets, lora_target_patterns, schema_for, schema_of_modules
from dreamomni2_jax.layout.ids_flux1 import SampleLayout
from dreamomni2_jax.testing.tiny_flux1 import FLUX_TINY
from dreamomni2_jax.testing.tiny_klein import FLUX2_TINY
from test_train_step import _dot_flops

TINY = {"flux": (FLUX_TINY, FluxConfig, FluxTransformer2DModel), "flux2": (FLUX2_TINY, Flux2Config,
                                                                          Flux2Transformer2DModel)}


def _torch_model(name: str, **overrides):
    from diffusers import Flux2Transformer2DModel as TorchFlux2, FluxTransformer2DModel as TorchFlux

    torch.manual_seed(0)
    return (TorchFlux if name == "flux" else TorchFlux2)(**{**TINY[name][0], **overrides})


def _ours(name: str, **overrides):
    raw, config_cls, model_cls = TINY[name]
    return model_cls(config_cls.from_dict({**raw, **overrides}), rngs=nnx.Rngs(0), dtype=jnp.float32,
                     param_dtype=jnp.float32)


def _unindexed(name: str) -> str:
    return re.sub(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.", r"\1.", name)


@pytest.mark.parametrize("name,guidance", [("flux", True), ("flux", False), ("flux2", False), ("flux2", True)])
def test_schema_declares_every_linear_of_the_diffusers_model(name, guidance):
    torch_model = _torch_model(name, guidance_embeds=guidance)
    linears = {_unindexed(n): (m.in_features, m.out_features) for n, m in torch_model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    config = TINY[name][1].from_dict({**TINY[name][0], "guidance_embeds": guidance})
    schema = schema_for(config)
    assert schema is SCHEMAS[name]
    assert {lin.module: schema.dims(lin, config) for lin in schema.present(config)} == linears
    assert schema.layer_counts(config) == {"transformer_blocks": len(torch_model.transformer_blocks),
                                           "single_transformer_blocks": len(torch_model.single_transformer_blocks)}


@pytest.mark.parametrize("name,preset,targets", [
    ("flux", "kontext_wide", ref.KONTEXT_SCRIPT_TARGET_MODULES),
    ("flux2", "klein_wide", ref.KLEIN_SCRIPT_TARGET_MODULES),
    ("flux2", "attention", ref.KLEIN_SCRIPT_DOUBLE_BLOCK_TARGET_MODULES),
])
def test_presets_adapt_what_peft_adapts_with_the_diffusers_script_targets(name, preset, targets):
    from peft import LoraConfig as PeftLoraConfig

    torch_model = _torch_model(name)
    torch_model.add_adapter(PeftLoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=targets))
    peft_paths = {_unindexed(n.rsplit(".lora_A", 1)[0]) for n, _ in torch_model.named_modules()
                  if n.endswith(".lora_A")}
    ours = attach_lora(_ours(name), config=LoraConfig(rank=2, alpha=2.0, preset=preset))["targets"]
    assert set(ours) == peft_paths and len(ours) == len(SCHEMAS[name].preset_modules(preset))


def test_release_attention_preset_is_the_same_modules_for_flux1():
    # FLUX.1 "attention": every q/k/v/out of the image and joint streams (the DreamOmni2 release config's regexes)
    release = (r"attn\.to_q", r"attn\.to_k", r"attn\.to_v", r"attn\.to_out\.0")
    model = _ours("flux")
    assert attach_lora(model, config=LoraConfig(preset="attention"))["targets"] == sorted((
        m for m in SCHEMAS["flux"].by_module() if any(re.search(p, m) for p in release)))
    with pytest.raises(ConfigError, match="lora.preset='klein_wide' is not a preset of the flux model"):
        lora_target_patterns(LoraConfig(preset="klein_wide"), model)
    assert set(lora_presets("flux2")) == {"attention", "klein_wide"}


def test_flux2_sharding_axes_and_undeclared_linears_fail():
    from types import SimpleNamespace

    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})
    spec = lambda path, shape: shd.param_spec(path, shape, mesh)  # noqa: E731
    d, m = 3072, 9216  # klein-4b
    assert spec("single_transformer_blocks.attn.to_qkv_mlp_proj.kernel", (20, d, 3 * d + 2 * m)) == \
        P(None, "fsdp", "tensor")
    # fused [attention | mlp] input: FSDP only, like FLUX.1's single-block proj_out
    assert spec("single_transformer_blocks.attn.to_out.kernel", (20, d + m, d)) == P(None, "fsdp", None)
    assert spec("transformer_blocks.attn.to_out.0.kernel", (5, d, d)) == P(None, "tensor", "fsdp")
    assert spec("transformer_blocks.ff.linear_in.kernel", (5, d, 2 * m)) == P(None, "fsdp", "tensor")
    assert spec("transformer_blocks.ff_context.linear_out.kernel", (5, m, d)) == P(None, "tensor", "fsdp")
    assert spec("double_stream_modulation_img.linear.kernel", (d, 6 * d)) == P(None, "fsdp")
    with pytest.raises(SchemaError, match=r"transformer_blocks\.attn\.to_qq: no model schema"):
        spec("transformer_blocks.attn.to_qq.kernel", (5, d, d))
    # every param of both real models is declared (no SchemaError), on a one-device mesh
    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), shd.AXES)
    for name in TINY:
        model = nnx.eval_shape(lambda: _ours(name, guidance_embeds=True))
        attach_lora(model, config=LoraConfig(preset="custom", targets=(r".",)))
        assert jax.tree.leaves(shd.model_state_shardings(nnx.state(model), one))


def test_schema_of_lora_modules():
    assert schema_of_modules(["transformer_blocks.3.attn.to_q", "single_transformer_blocks.0.proj_mlp"]).name == "flux"
    assert schema_of_modules(["single_transformer_blocks.1.attn.to_qkv_mlp_proj"]).name == "flux2"
    with pytest.raises(SchemaError, match="ff.net.0.proj_typo"):
        schema_of_modules(["transformer_blocks.0.ff.net.0.proj_typo"])


def test_family_of_a_config_is_the_one_of_its_schema():
    from dreamomni2_jax import families

    assert {f.schema for f in families.FAMILIES.values()} == set(SCHEMAS)  # one family per schema, and back
    for config, name in ((FluxConfig(**FLUX_TINY), "flux1"), (Flux2Config(**FLUX2_TINY), "flux2-klein")):
        fam = families.for_config(config)
        assert fam.name == name and schema_for(config).name == fam.schema
        assert isinstance(config, fam.config_class())
    with pytest.raises(TypeError, match="no model family .* LoraConfig"):
        families.for_config(LoraConfig())


@pytest.mark.parametrize("overrides", [{}, {"guidance_embeds": True, "num_single_layers": 1, "mlp_ratio": 2.0}])
def test_flux2_flops_formula_matches_traced_lora_step(overrides):
    model = _ours("flux2", **overrides)
    cfg = model.config
    attach_lora(model, config=LoraConfig(rank=4, alpha=4.0, preset="klein_wide", targets=(
        r"^x_embedder$", r"^proj_out$", r"ff_context\.linear_in", r"add_v_proj", r"single_stream_modulation")))
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    layout, n_txt, batch = SampleLayout(target=(4, 6), references=((4, 4),)), 5, 2
    t, r = layout.target_tokens, layout.reference_tokens
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, t + r, cfg.in_channels), np.float32))
    ctx = jnp.asarray(rng.standard_normal((batch, n_txt, cfg.joint_attention_dim), np.float32))
    target = jnp.zeros((batch, t, cfg.out_dim))
    guidance = jnp.full((batch,), 3.5) if cfg.guidance_embeds else None

    def loss(lora_state):
        out = nnx.merge(graphdef, lora_state, frozen)(x, ctx, jnp.full((batch,), 0.5), P2.sample_ids(layout),
                                                      P2.text_ids(n_txt), guidance, n_out=t)
        return jnp.mean((out - target) ** 2)

    counted = _dot_flops(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr)
    ours = perf.flux_train_flops(cfg, (batch, t, r), n_txt, perf.lora_dims(model))
    assert abs(ours - counted) / counted < 0.02, (ours, counted)
