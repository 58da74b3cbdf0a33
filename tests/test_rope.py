"""RoPE tables and rotation against diffusers' FluxPosEmbed / apply_rotary_emb."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from dreamomni2_jax.layout import ids_flux1 as P
from dreamomni2_jax.models.rope import apply_rope, rope_cos_sin


def _ids_with_large_positions():
    lay = P.batch_layout([P.SampleLayout((128, 128), ((128, 96), (64, 128), (128, 128)))], "dreamomni2")
    ids = lay.ids[0]
    extra = np.stack([np.zeros(64), np.arange(960, 1024), np.arange(0, 1024, 16)], -1).astype(np.int32)
    ids = np.concatenate([P.text_ids(8), ids, extra])
    assert ids.max() > 256  # beyond what bf16 ids can hold exactly
    return ids


@pytest.mark.parametrize("axes_dim", [(16, 56, 56), (4, 6, 6)])
def test_rope_tables_match_flux_pos_embed(axes_dim):
    ids = _ids_with_large_positions()
    cos, sin = rope_cos_sin(ids, axes_dim, 10000.0)
    ref_cos, ref_sin = FluxPosEmbed(10000, list(axes_dim))(torch.from_numpy(ids).float())
    assert cos.shape == (len(ids), sum(axes_dim)) and cos.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=1e-4, rtol=0)


def test_per_sample_ids_batch_dimension():
    ids = np.stack([_ids_with_large_positions()] * 2)
    ids[1, :, 2] += 3
    cos, sin = rope_cos_sin(ids)
    assert cos.shape == (2, ids.shape[1], 128)
    c1, _ = rope_cos_sin(ids[1])
    np.testing.assert_array_equal(np.asarray(cos[1]), np.asarray(c1))


def test_bf16_ids_are_refused():
    with pytest.raises(TypeError, match="bf16"):
        rope_cos_sin(jnp.zeros((4, 3), jnp.bfloat16))


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_apply_rope_matches_apply_rotary_emb(dtype):
    ids = _ids_with_large_positions()
    cos, sin = rope_cos_sin(ids)
    x = np.random.default_rng(0).standard_normal((2, len(ids), 3, 128)).astype(np.float32)
    ours = apply_rope(jnp.asarray(x, dtype), cos, sin)
    ref = apply_rotary_emb(torch.from_numpy(np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))),
                           (torch.from_numpy(np.asarray(cos)), torch.from_numpy(np.asarray(sin))),
                           use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
    assert ours.dtype == jnp.asarray(x, dtype).dtype
    tol = 1e-5 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(ours.astype(jnp.float32)), ref.numpy(), atol=tol, rtol=tol)
