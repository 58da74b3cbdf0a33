"""The tiny FLUX.2 [klein] transformer with klein_wide LoRA, created sharded over a (data 2, fsdp 2, tensor 2) mesh
with the schema-derived axes, gives the same forward output and LoRA gradients as on one device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from support.asserts import rel_err
from dreamomni2_jax.layout import ids_klein as P2
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.config import LoraConfig, MeshConfig
from dreamomni2_jax.lora.layers import LoRAParam, lora_state, set_lora_state
from dreamomni2_jax.models.flux2 import Flux2Config, Flux2Transformer2DModel
from dreamomni2_jax.layout.ids_flux1 import SampleLayout
from dreamomni2_jax.testing.tiny_klein import FLUX2_TINY


def build():
    model = Flux2Transformer2DModel(Flux2Config.from_dict(FLUX2_TINY), rngs=nnx.Rngs(0), dtype=jnp.float32,
                                    param_dtype=jnp.float32)
    attach_lora(model, config=LoraConfig(rank=4, alpha=4.0, preset="klein_wide", targets=(r"ff\.linear_in",)),
                seed=1)
    return model


def test_flux2_sharded_over_data_fsdp_tensor_matches_one_device():
    layout, n_txt, batch = SampleLayout(target=(4, 6), references=((4, 4),)), 6, 4
    rng = np.random.default_rng(0)
    c = Flux2Config.from_dict(FLUX2_TINY)
    n = layout.target_tokens + layout.reference_tokens
    x = rng.standard_normal((batch, n, c.in_channels), np.float32)
    ctx = rng.standard_normal((batch, n_txt, c.joint_attention_dim), np.float32)
    ts = rng.uniform(0, 1, batch).astype(np.float32)
    img_ids, txt_ids = P2.sample_ids(layout), P2.text_ids(n_txt)

    def run(mesh):
        rng_b = np.random.default_rng(5)  # the same non-zero lora_B on both
        model = build() if mesh is None else shd.init_sharded(build, mesh)
        set_lora_state(model, {k: np.asarray(v) + (0.1 * rng_b.standard_normal(v.shape).astype(np.float32)
                                                   if k.endswith("B") else 0) for k, v in lora_state(model).items()})
        graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)

        @jax.jit
        def loss_and_grad(lora, frozen, x, ctx, ts):
            def loss(lora):
                out = nnx.merge(graphdef, lora, frozen)(x, ctx, ts, img_ids, txt_ids, n_out=layout.target_tokens)
                return jnp.mean(out ** 2), out
            return jax.value_and_grad(loss, has_aux=True)(lora)

        args = (x, ctx, ts) if mesh is None else tuple(shd.put_batch({"a": a}, mesh)["a"] for a in (x, ctx, ts))
        (_, out), grads = loss_and_grad(lora, frozen, *args)
        specs = {}
        if mesh is not None:
            state = nnx.state(model)
            for path in ("single_transformer_blocks.attn.to_qkv_mlp_proj.kernel",
                         "transformer_blocks.ff.linear_in.kernel", "transformer_blocks.ff.linear_out.kernel",
                         "single_transformer_blocks.attn.to_out.kernel"):
                leaf = state
                for part in path.split("."):
                    leaf = leaf[int(part) if part.isdigit() else part]
                specs[path] = str(leaf[...].sharding.spec)
        return np.asarray(out), [np.asarray(g) for g in jax.tree.leaves(grads)], specs

    out1, g1, _ = run(None)
    out8, g8, specs = run(shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    assert specs == {
        "single_transformer_blocks.attn.to_qkv_mlp_proj.kernel": "P(None, 'fsdp', 'tensor')",
        "transformer_blocks.ff.linear_in.kernel": "P(None, 'fsdp', 'tensor')",
        "transformer_blocks.ff.linear_out.kernel": "P(None, 'tensor', 'fsdp')",
        "single_transformer_blocks.attn.to_out.kernel": "P(None, 'fsdp', None)"}
    assert len(g1) == 2 * 7 and rel_err(out8, out1) < 1e-5, rel_err(out8, out1)
    assert max(rel_err(b, a) for a, b in zip(g1, g8)) < 1e-4
