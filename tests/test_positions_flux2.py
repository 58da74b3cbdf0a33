"""FLUX.2 4-axis position ids against the real ``Flux2KleinPipeline`` static id builders, and 4-axis rope against
diffusers' ``Flux2PosEmbed``."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

from dreamomni2_jax.layout import ids_flux1 as P
from dreamomni2_jax.layout import ids_klein as P2
from dreamomni2_jax.models.rope import rope_cos_sin


def _patchified(latent_hw):
    """A patchified latent (B, C*4, H/2, W/2) as the pipeline builds it from a VAE latent of (H, W)."""
    return Flux2KleinPipeline._patchify_latents(torch.zeros(1, 4, *latent_hw))


@pytest.mark.parametrize("refs", [
    [(32, 48)],
    [(32, 48), (16, 16)],
    [(32, 48), (24, 64), (40, 40)],
    [(8, 8), (2, 2), (6, 10), (12, 4)],
])
def test_ids_match_klein_pipeline(refs):
    target = (40, 24)
    want_target = Flux2KleinPipeline._prepare_latent_ids(_patchified(target))[0].numpy()
    want_refs = Flux2KleinPipeline._prepare_image_ids([_patchified(r) for r in refs])[0].numpy()
    np.testing.assert_array_equal(P2.target_ids(*target), want_target)
    np.testing.assert_array_equal(P2.reference_ids(refs), want_refs)
    layout = P.SampleLayout(target, tuple(refs))
    np.testing.assert_array_equal(P2.sample_ids(layout), np.concatenate([want_target, want_refs]))
    assert P2.sample_ids(layout).dtype == np.int32
    assert sorted(set(want_refs[:, 0].tolist())) == [10 * (i + 1) for i in range(len(refs))]


def test_text_ids_match_klein_pipeline():
    want = Flux2KleinPipeline._prepare_text_ids(torch.zeros(2, 13, 8))
    np.testing.assert_array_equal(P2.text_ids(13), want[0].numpy())
    np.testing.assert_array_equal(P2.text_ids(13), want[1].numpy())


def test_pack_latents_is_klein_patchify_then_pack():
    lat = torch.randn(2, 4, 6, 10)
    want = Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._patchify_latents(lat)).numpy()
    got = P.pack_latents(lat.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(got, want)
    back = Flux2KleinPipeline._unpatchify_latents(
        Flux2KleinPipeline._unpack_latents_with_ids(torch.from_numpy(got), torch.from_numpy(P2.target_ids(6, 10))[None]
                                                    .expand(2, -1, -1), 3, 5))
    np.testing.assert_array_equal(P.unpack_latents(got, 6, 10), back.permute(0, 2, 3, 1).numpy())


def test_batch_layout_pads_per_section():
    samples = [P.SampleLayout((4, 6), ((4, 4), (2, 6))), P.SampleLayout((6, 4), ((2, 2),))]
    lay = P.batch_layout(samples, P.FLUX2)
    assert lay.ids.shape == (2, 6 + 7, 4) and lay.target_len == 6 and lay.reference_len == 7
    for b, s in enumerate(samples):
        ref = P2.reference_ids(s.references)
        np.testing.assert_array_equal(lay.ids[b, :s.target_tokens], P2.target_ids(*s.target))
        np.testing.assert_array_equal(lay.ids[b, 6:6 + len(ref)], ref)
        assert lay.mask[b].sum() == s.target_tokens + len(ref)
    with pytest.raises(ValueError, match="target_len"):
        P.batch_layout(samples, P.FLUX2, target_len=2)


def test_rope_4_axes_matches_flux2_pos_embed():
    ids = np.concatenate([P2.text_ids(300), P2.sample_ids(P.SampleLayout((64, 96), ((128, 128), (32, 64), (8, 8))))])
    for axes in ((32, 32, 32, 32), (4, 4, 4, 4)):
        cos, sin = rope_cos_sin(ids, axes, 2000.0)
        ref_cos, ref_sin = Flux2PosEmbed(2000, list(axes))(torch.from_numpy(ids))
        assert cos.shape == (len(ids), sum(axes)) and cos.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=1e-4, rtol=0)


def test_layout_script_shows_klein_ids(tmp_path, capsys):
    """``scripts/layout.py`` given a klein model folder lays out the pipeline's 4-axis ids."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "layout.py"
    spec = importlib.util.spec_from_file_location("_layout_script", path)
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    refs_px = [(128, 128), (128, 96), (96, 160)]
    parts = layout.segments((64, 80), refs_px, P.FLUX2, 7)
    want = Flux2KleinPipeline._prepare_image_ids([_patchified((h // 8, w // 8)) for h, w in refs_px])[0].numpy()
    np.testing.assert_array_equal(np.concatenate([ids for _, _, _, ids in parts[2:]]), want)
    model = tmp_path / "klein"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "Flux2Transformer2DModel", "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000}))
    demo = str(path.parents[1] / "configs" / "demo.py")
    assert layout.main(["--config", demo, "--set", f"model.path={model}", "--refs", "2"]) == 0
    out = capsys.readouterr().out
    assert "scheme=flux2" in out and "theta=2000" in out and "ids int32 (" in out and ", 4)" in out
    # a 3-axis scheme on the 4-axis model, or an unknown scheme: one line, exit 2
    assert layout.main(["--config", demo, "--set", f"model.path={model}", "--scheme", "kontext"]) == 2
    assert "4 rope axes" in capsys.readouterr().err
    assert layout.main(["--config", demo, "--scheme", "nope"]) == 2
    assert "'nope': unknown" in capsys.readouterr().err
