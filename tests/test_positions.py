"""Position ids and packing against diffusers' FluxKontextPipeline and a transcription of DreamOmni2's loop."""
import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline

from dreamomni2_jax.layout import ids_flux1 as P


def _kontext_prepare_latents(ref_latent_hw, target_hw):
    """Run the real FluxKontextPipeline.prepare_latents on latents of the given (latent) sizes."""
    pipe = object.__new__(FluxKontextPipeline)  # the method needs only vae_scale_factor
    pipe.vae_scale_factor = 8
    pipe.latent_channels = 4
    c = 4
    image = torch.randn(1, c, *ref_latent_hw)  # already-latent input (channels == num_channels_latents)
    h_px, w_px = target_hw[0] * 8, target_hw[1] * 8
    _, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        image, 1, c, h_px, w_px, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    return latent_ids.numpy(), image_ids.numpy(), image, image_latents


def _dreamomni2_ids(ref_latent_sizes):
    """Test-side transcription of the DreamOmni2 pipeline's prepare_latents id loop (pipeline_dreamomni2.py)."""
    h_offset = 0
    w_offset = 0
    tp_image_ids = []
    for i, (lh, lw) in enumerate(ref_latent_sizes):
        image_ids = FluxKontextPipeline._prepare_latent_image_ids(1, lh // 2, lw // 2, "cpu", torch.float32)
        image_ids[..., 0] = i + 1
        image_ids[..., 2] += w_offset
        tp_image_ids.append(image_ids)
        h_offset += lh // 2
        w_offset += lw // 2
    return torch.cat(tp_image_ids, dim=0).numpy()


def test_single_reference_equals_kontext_ids_for_both_schemes():
    # The regression that broke another trainer's Kontext training: one reference must give exactly Kontext's ids.
    for ref, tgt in [((32, 48), (40, 40)), ((128, 96), (128, 128)), ((2, 2), (4, 6))]:
        latent_ids, image_ids, _, _ = _kontext_prepare_latents(ref, tgt)
        np.testing.assert_array_equal(P.target_ids(*tgt), latent_ids)
        for scheme in ("dreamomni2", "kontext"):
            ours = P.reference_ids([ref], scheme)
            assert ours.dtype == np.int32
            np.testing.assert_array_equal(ours, image_ids)


@pytest.mark.parametrize("sizes", [[(32, 48), (16, 16)], [(32, 48), (24, 64), (40, 40)], [(8, 8)] * 4])
def test_multi_reference_ids_match_dreamomni2_loop(sizes):
    ours = P.reference_ids(sizes, "dreamomni2")
    np.testing.assert_array_equal(ours, _dreamomni2_ids(sizes))
    # Domains count up from 1 and the column offset is cumulative over previous widths (in tokens).
    assert sorted(set(ours[:, 0].tolist())) == list(range(1, len(sizes) + 1))


def test_kontext_scheme_has_no_offset_for_several_refs():
    sizes = [(32, 48), (24, 64), (40, 40)]
    ours = P.reference_ids(sizes, "kontext")
    start = 0
    for i, (h, w) in enumerate(sizes):
        n = (h // 2) * (w // 2)
        ref = FluxKontextPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32).numpy()
        ref[:, 0] = i + 1
        np.testing.assert_array_equal(ours[start : start + n], ref)
        start += n
    assert start == len(ours)


def test_text_ids_and_unknown_scheme():
    assert P.text_ids(7).shape == (7, 3) and not P.text_ids(7).any()
    with pytest.raises(ValueError, match="unknown position scheme"):
        P.reference_ids([(4, 4)], "nope")
    with pytest.raises(ValueError, match="even"):
        P.target_ids(5, 4)


def test_caller_scheme_without_a_registry():
    ids = P.reference_ids([(4, 4), (4, 4)], lambda sizes: [7 * i for i in range(len(sizes))])
    assert ids[4:, 2].min() == 7
    assert "test_double" not in P.SCHEMES and sorted(P.schemes()) == ["dreamomni2", "flux2", "kontext"]
    with pytest.raises(TypeError):
        P.SCHEMES["test_double"] = lambda sizes: [0] * len(sizes)  # read-only: no process-wide edits


def test_pack_matches_diffusers_and_round_trips():
    _, _, image, image_latents = _kontext_prepare_latents((12, 20), (8, 8))
    nhwc = image.numpy().transpose(0, 2, 3, 1)
    packed = P.pack_latents(nhwc)
    np.testing.assert_array_equal(packed, image_latents.numpy())
    np.testing.assert_array_equal(P.unpack_latents(packed, 12, 20), nhwc)
    # diffusers' own unpack (pixel sizes) agrees too
    unpacked = FluxKontextPipeline._unpack_latents(image_latents, 12 * 8, 20 * 8, 8).numpy()
    np.testing.assert_array_equal(unpacked.transpose(0, 2, 3, 1), nhwc)
    with pytest.raises(ValueError):
        P.unpack_latents(packed, 12, 22)


def test_pack_works_on_jax_arrays():
    import jax.numpy as jnp

    x = np.random.randn(2, 6, 4, 3).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(P.pack_latents(jnp.asarray(x))), P.pack_latents(x))


def test_batch_layout_pads_per_section_and_masks():
    samples = [
        P.SampleLayout((8, 8), ((8, 8),)),
        P.SampleLayout((4, 8), ((8, 8), (4, 4), (8, 4))),
        P.SampleLayout((8, 4), ()),
    ]
    lay = P.batch_layout(samples, "dreamomni2")
    assert lay.target_len == 16 and lay.reference_len == 16 + 4 + 8
    assert lay.ids.shape == (3, lay.target_len + lay.reference_len, 3) and lay.ids.dtype == np.int32
    for b, s in enumerate(samples):
        np.testing.assert_array_equal(lay.ids[b, : s.target_tokens], P.target_ids(*s.target))
        ref = P.reference_ids(s.references, "dreamomni2")
        np.testing.assert_array_equal(lay.ids[b, lay.target_len : lay.target_len + len(ref)], ref)
        assert lay.mask[b].sum() == s.target_tokens + s.reference_tokens
        assert lay.target_mask[b].sum() == s.target_tokens
        np.testing.assert_array_equal(s.ids(), np.concatenate([P.target_ids(*s.target), ref]))
    with pytest.raises(ValueError, match="target_len"):
        P.batch_layout(samples, target_len=4)


def test_bfloat16_ids_round_like_the_reference_pipelines():
    """model.ids_dtype=bfloat16: the ids the bf16 diffusers / DreamOmni2 pipelines feed (``_prepare_latent_image_ids``
    then ``.to(dtype=torch.bfloat16)``) and the RoPE diffusers' FluxPosEmbed makes of them; int32 stays exact."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from dreamomni2_jax.config import ModelConfig
    from dreamomni2_jax.models.rope import rope_cos_sin

    assert ModelConfig().ids_dtype == "int32"
    ids = P.SampleLayout((64, 64), ((94, 174), (94, 174), (94, 174))).ids("dreamomni2")  # columns up to 260
    assert ids[:, 2].max() > 256
    want = torch.from_numpy(ids).to(torch.bfloat16).float()
    got = np.asarray(P.round_ids(ids, "bfloat16"))
    np.testing.assert_array_equal(got, want.numpy())
    assert (got != ids).any() and P.round_ids(ids, "int32") is ids
    cos_ref, sin_ref = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(want)
    cos, sin = rope_cos_sin(got)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=2e-5)
    with pytest.raises(ValueError, match="not one of"):
        P.round_ids(ids, "float16")
