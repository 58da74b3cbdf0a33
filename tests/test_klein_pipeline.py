"""A tiny random ``Flux2KleinPipeline`` folder written by diffusers -> convert/pipeline.py -> our components give the
pipeline's prompt embeddings and latent tokens; the model family is recorded in the converted folder."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from support.asserts import assert_close
from dreamomni2_jax.convert import pipeline as cpipe
from dreamomni2_jax.weights import store
from dreamomni2_jax.text import klein as text_klein
from dreamomni2_jax.convert.loaders import load_flux2
from dreamomni2_jax.convert.loaders import load_qwen3
from dreamomni2_jax.models.vae_flux2 import encode_tokens
from dreamomni2_jax.convert.loaders import load_vae_flux2
from dreamomni2_jax.testing.tiny_klein import QWEN3_TINY_LAYERS, build_klein_pipeline
from dreamomni2_jax.weights.manifest import read_family, read_manifest

MODELS = ("transformer", "vae", "text_encoder")
PROMPTS = ["a cat", "a photo of the cat"]
MAX_LEN = 48


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    from diffusers import Flux2KleinPipeline

    src = build_klein_pipeline(tmp_path_factory.mktemp("klein") / "flux2-klein", seed=0)
    out = src.parent / "flux2-klein-jax"
    assert cpipe.main(["--src", str(src), "--out", str(out), "--dtype", "fp32", "--no-progress"]) == 0
    return src, out, Flux2KleinPipeline.from_pretrained(src, torch_dtype=torch.float32)


def test_layout_family_and_weights(klein):
    src, out, pipe = klein
    manifest = read_manifest(out)
    assert manifest["pipeline_class"] == "Flux2KleinPipeline"
    assert manifest["family"] == read_family(out) == "flux2-klein"
    assert {c: manifest["components"][c]["dtype"] for c in MODELS} == {c: "fp32" for c in MODELS}
    assert sorted(manifest["components"]) == sorted([*MODELS, "tokenizer", "scheduler"])
    for c in MODELS:
        assert store.is_converted(out / c)
    for c in ("tokenizer", "scheduler"):
        for f in (src / c).rglob("*"):
            assert (out / c / f.relative_to(src / c)).read_bytes() == f.read_bytes()
    te = load_qwen3(out / "text_encoder", jnp.float32)
    np.testing.assert_array_equal(np.asarray(te.norm.scale[...]), pipe.text_encoder.model.norm.weight.detach().numpy())
    tr = load_flux2(out / "transformer", dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(tr.proj_out.kernel[...]),
                                  pipe.transformer.proj_out.weight.detach().numpy().T)


def test_family_is_read_from_every_kind_of_model_folder(klein, tmp_path):
    from dreamomni2_jax import families

    src, out, _ = klein
    klein_family = families.get("flux2-klein")
    for p in (out, src, out / "transformer", src / "transformer"):  # converted, diffusers, transformer folders
        assert families.for_path(p) is klein_family, p
    assert families.for_path(tmp_path) is families.get("flux1")
    assert families.for_model(load_flux2(out / "transformer", dtype=jnp.float32)) is klein_family
    with pytest.raises(ValueError, match="unknown model family"):
        families.get("flux3")


def test_prompt_embeds_match_pipeline_encode_prompt(klein):
    _, out, pipe = klein
    with torch.no_grad():
        want, want_ids = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=MAX_LEN,
                                            text_encoder_out_layers=QWEN3_TINY_LAYERS)
    tok = text_klein.load_tokenizer(out / "tokenizer")
    ids, mask = text_klein.tokenize(tok, PROMPTS, MAX_LEN)
    assert mask[0].sum() < mask[1].sum() < MAX_LEN  # right padding exercised, different lengths
    got = text_klein.encode_prompt(load_qwen3(out / "text_encoder", jnp.float32), tok, PROMPTS, MAX_LEN,
                                   QWEN3_TINY_LAYERS)
    assert got.shape == want.shape
    assert_close(got, want.numpy(), 1e-4)
    from dreamomni2_jax.layout.ids_klein import text_ids
    np.testing.assert_array_equal(text_ids(MAX_LEN), want_ids[0].numpy())


def test_reference_latents_match_prepare_image_latents(klein):
    """Two references of different sizes: packed tokens and ids as ``prepare_image_latents`` builds them."""
    from dreamomni2_jax.layout import ids_klein as P2

    _, out, pipe = klein
    rng = np.random.default_rng(0)
    images = [rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32) for h, w in ((32, 48), (48, 16))]
    with torch.no_grad():
        want, want_ids = pipe.prepare_image_latents([torch.from_numpy(x) for x in images], 1, None,
                                                    torch.device("cpu"), torch.float32)
    vae = load_vae_flux2(out / "vae", jnp.float32)
    got = np.concatenate([np.asarray(encode_tokens(vae, jnp.asarray(x.transpose(0, 2, 3, 1)))) for x in images], 1)
    assert_close(got, want.numpy(), 1e-4)
    np.testing.assert_array_equal(P2.reference_ids([(4, 6), (6, 2)]), want_ids[0].numpy())


def test_bad_klein_folder_names_every_problem(klein, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(klein[0], src)
    index = json.loads((src / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (src / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(src / "vae")
    with pytest.raises(ValueError) as e:
        cpipe.validate_source(src)
    msg = str(e.value)
    assert "Flux2KleinPipeline" in msg and "'text_encoder'" in msg and "vae" in msg
    with pytest.raises(ValueError, match="not a converted pipeline"):
        read_family(tmp_path)


# --------------------------------------------------------------------------- sampler parity

STEPS = 3
PROMPT = "put the hat from image 2 on the person in image 1"
H, W = 32, 48  # output: 2 x 3 tokens


def _image(seed: int, w: int, h: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def jax_pipe(klein):
    from dreamomni2_jax.sample import pipeline as sampler

    return sampler.load_pipeline(klein[1], jnp.float32, max_sequence_length=MAX_LEN)


@pytest.mark.parametrize("refs,guidance", [
    ([(96, 64)], 4.0),  # CFG against the empty prompt
    ([(96, 64), (64, 80)], 1.0),  # no CFG
    ([(64, 64), (80, 64), (70, 83)], 2.5),  # last reference centre-cropped to 64 x 80
])
def test_sampler_matches_flux2_klein_pipeline(klein, jax_pipe, refs, guidance):
    """``Flux2KleinPipeline.__call__`` (1-3 references, CFG on/off, ``compute_empirical_mu`` shift) and our sampler
    from the same initial latents give the same images."""
    from dreamomni2_jax import families

    _, _, pipe = klein
    assert jax_pipe.family is families.get("flux2-klein")
    images = [_image(i, w, h) for i, (w, h) in enumerate(refs)]
    c4 = pipe.transformer.config.in_channels
    lat = np.random.default_rng(len(refs)).standard_normal((1, c4, H // 16, W // 16)).astype(np.float32)
    with torch.no_grad():
        want = pipe(image=images, prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS,
                    guidance_scale=guidance, latents=torch.from_numpy(lat), output_type="np",
                    max_sequence_length=MAX_LEN, text_encoder_out_layers=QWEN3_TINY_LAYERS).images
    packed = lat.reshape(1, c4, -1).transpose(0, 2, 1)  # the pipeline's _pack_latents
    got = jax_pipe(PROMPT, images, height=H, width=W, steps=STEPS, guidance=guidance, latents=packed,
                   progress=False)
    assert got.shape == want.shape == (1, H, W, 3)
    assert float(np.abs(want - 0.5).max()) > 0.05  # not a flat image
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_compute_empirical_mu_is_the_pipelines():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as want

    from dreamomni2_jax.families import compute_empirical_mu

    for seq, steps in ((6, 3), (1024, 4), (4096, 50), (4301, 28), (16384, 50)):
        assert compute_empirical_mu(seq, steps) == want(seq, steps)
