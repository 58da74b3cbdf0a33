"""Module schema of the FLUX.2 transformer (:class:`~dreamomni2_jax.models.flux2.Flux2Transformer2DModel`): every
Linear's stream, role, shape, stacked group and BFL name, declared once (see :mod:`dreamomni2_jax.models.roles`).
No biases; single blocks already hold one fused ``to_qkv_mlp_proj`` (= BFL ``linear1``) and ``to_out``
(= ``linear2``), so only the double blocks' BFL ``qkv`` is split into parts."""
from __future__ import annotations

from dreamomni2_jax.models.flux_schema import DOUBLE_ATTENTION, FINAL_LAYER
from dreamomni2_jax.models.roles import Linear as L, ModelSchema, Select

_D, _S = "transformer_blocks", "single_transformer_blocks"
_T = "time_guidance_embed."

FLUX2_SCHEMA = ModelSchema(
    name="flux2",
    config_class="Flux2Config",
    groups={_D: ("num_layers", "double_blocks"), _S: ("num_single_layers", "single_blocks")},
    sizes={"d": "c.inner_dim", "m": "c.mlp_hidden_dim", "cin": "c.in_channels", "cout": "c.out_dim",
           "ctx": "c.joint_attention_dim", "t": "c.timestep_guidance_channels"},
    kohya_version="flux2",
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
        L("double_stream_modulation_img.linear", None, "vector", "mod", ("d", "6*d"),
          "double_stream_modulation_img.lin"),
        L("double_stream_modulation_txt.linear", None, "vector", "mod", ("d", "6*d"),
          "double_stream_modulation_txt.lin"),
        L("single_stream_modulation.linear", None, "vector", "mod", ("d", "3*d"), "single_stream_modulation.lin"),
        *FINAL_LAYER,
        # double-stream blocks: FLUX.1's joint attention, SwiGLU feed-forwards (linear_in = gate | up)
        *DOUBLE_ATTENTION,
        L("ff.linear_in", _D, "image", "mlp_in", ("d", "2*m"), "img_mlp.0"),
        L("ff.linear_out", _D, "image", "mlp_out", ("m", "d"), "img_mlp.2"),
        L("ff_context.linear_in", _D, "text", "mlp_in", ("d", "2*m"), "txt_mlp.0"),
        L("ff_context.linear_out", _D, "text", "mlp_out", ("m", "d"), "txt_mlp.2"),
        # single-stream blocks (the fused input projection runs on every row, also in the last block)
        L("attn.to_qkv_mlp_proj", _S, "joint", "qkv_mlp", ("d", "3*d+2*m"), "linear1", full_rows=True),
        L("attn.to_out", _S, "joint", "attn_mlp_out", ("d+m", "d"), "linear2"),
    ),
    presets={
        # attention only: the double blocks' image-stream q/k/v/out (the single blocks' projections are fused
        # with the MLP)
        "attention": (Select(("q", "k", "v", "out"), streams=("image", "joint")),),
        # diffusers' train_dreambooth_lora_flux2_klein.py default target_modules: to_k, to_q, to_v, to_out.0,
        # to_qkv_mlp_proj and every single block's attn.to_out
        "klein_wide": (Select(("q", "k", "v", "out"), streams=("image", "joint")),
                       Select(("qkv_mlp", "attn_mlp_out"), groups=(_S,))),
    },
)
