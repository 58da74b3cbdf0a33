"""Module schema of the FLUX.1 transformer (:class:`~dreamomni2_jax.models.flux.FluxTransformer2DModel`): every
Linear's stream, role, shape, stacked group and BFL name, declared once (see :mod:`dreamomni2_jax.models.roles`).
LoRA presets, sharding axes, the FLOP model and the kohya/BFL LoRA tables are derived from it."""
from __future__ import annotations

from dreamomni2_jax.models.roles import Linear as L, ModelSchema, Select

_D, _S = "transformer_blocks", "single_transformer_blocks"
_T = "time_text_embed."

# Joint attention of the double blocks (image q/k/v/out, text add_*; BFL fuses q|k|v) and the final layer: the same
# in FLUX.2 (models/flux2_schema.py reuses them).
DOUBLE_ATTENTION = (
    L("attn.to_q", _D, "image", "q", ("d", "d"), "img_attn.qkv", part=0),
    L("attn.to_k", _D, "image", "k", ("d", "d"), "img_attn.qkv", part=1),
    L("attn.to_v", _D, "image", "v", ("d", "d"), "img_attn.qkv", part=2),
    L("attn.to_out.0", _D, "image", "out", ("d", "d"), "img_attn.proj"),
    L("attn.add_q_proj", _D, "text", "q", ("d", "d"), "txt_attn.qkv", part=0),
    L("attn.add_k_proj", _D, "text", "k", ("d", "d"), "txt_attn.qkv", part=1),
    L("attn.add_v_proj", _D, "text", "v", ("d", "d"), "txt_attn.qkv", part=2),
    L("attn.to_add_out", _D, "text", "out", ("d", "d"), "txt_attn.proj"),
)
FINAL_LAYER = (
    L("norm_out.linear", None, "vector", "mod", ("d", "2*d"), "final_layer.adaLN_modulation.1", swapped=True),
    L("proj_out", None, "output", "final", ("d", "cout"), "final_layer.linear"),
)

FLUX_SCHEMA = ModelSchema(
    name="flux",
    config_class="FluxConfig",
    groups={_D: ("num_layers", "double_blocks"), _S: ("num_single_layers", "single_blocks")},
    sizes={"d": "c.inner_dim", "m": "4 * c.inner_dim", "cin": "c.in_channels", "cout": "c.out_dim",
           "ctx": "c.joint_attention_dim", "pool": "c.pooled_projection_dim", "t": "256"},
    kohya_version="flux1",
    linears=(
        # top level
        L("x_embedder", None, "image", "embed", ("cin", "d"), "img_in"),
        L("context_embedder", None, "text", "embed", ("ctx", "d"), "txt_in"),
        L(_T + "timestep_embedder.linear_1", None, "vector", "embed", ("t", "d"), "time_in.in_layer"),
        L(_T + "timestep_embedder.linear_2", None, "vector", "embed", ("d", "d"), "time_in.out_layer"),
        L(_T + "guidance_embedder.linear_1", None, "vector", "embed", ("t", "d"), "guidance_in.in_layer",
          when="guidance_embeds"),
        L(_T + "guidance_embedder.linear_2", None, "vector", "embed", ("d", "d"), "guidance_in.out_layer",
          when="guidance_embeds"),
        L(_T + "text_embedder.linear_1", None, "vector", "embed", ("pool", "d"), "vector_in.in_layer"),
        L(_T + "text_embedder.linear_2", None, "vector", "embed", ("d", "d"), "vector_in.out_layer"),
        *FINAL_LAYER,
        # double-stream blocks
        L("norm1.linear", _D, "vector", "mod", ("d", "6*d"), "img_mod.lin"),
        L("norm1_context.linear", _D, "vector", "mod", ("d", "6*d"), "txt_mod.lin"),
        *DOUBLE_ATTENTION,
        L("ff.net.0.proj", _D, "image", "mlp_in", ("d", "m"), "img_mlp.0"),
        L("ff.net.2", _D, "image", "mlp_out", ("m", "d"), "img_mlp.2"),
        L("ff_context.net.0.proj", _D, "text", "mlp_in", ("d", "m"), "txt_mlp.0"),
        L("ff_context.net.2", _D, "text", "mlp_out", ("m", "d"), "txt_mlp.2"),
        # single-stream blocks: BFL fuses q | k | v | mlp into linear1
        L("norm.linear", _S, "vector", "mod", ("d", "3*d"), "modulation.lin"),
        L("attn.to_q", _S, "joint", "q", ("d", "d"), "linear1", part=0),
        L("attn.to_k", _S, "joint", "k", ("d", "d"), "linear1", part=1, full_rows=True),
        L("attn.to_v", _S, "joint", "v", ("d", "d"), "linear1", part=2, full_rows=True),
        L("proj_mlp", _S, "joint", "mlp_in", ("d", "m"), "linear1", part=3, ratio=4),
        L("proj_out", _S, "joint", "attn_mlp_out", ("d+m", "d"), "linear2"),
    ),
    presets={
        # DreamOmni2 release config: every attention's q/k/v/out projections of the image and joint streams.
        "attention": (Select(("q", "k", "v", "out"), streams=("image", "joint")),),
        # diffusers' train_dreambooth_lora_flux_kontext.py default target_modules (peft suffix matches).
        "kontext_wide": (Select(("q", "k", "v", "out", "mlp_in", "mlp_out")),),
    },
)
