"""Sampler parity: our JAX pipeline vs diffusers' FluxKontextPipeline (1 reference, with/without LoRA, true CFG,
batches) and vs a test-side transcription of the DreamOmni2 multi-image ``prepare_latents`` loop driving the
diffusers components (2 and 3 references). Same initial noise on both sides (``latents=``), float32."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS, calculate_shift
from PIL import Image

import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.sample import pipeline as sampler
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.images.io import BadInput
from dreamomni2_jax.lora.files import LoraFileError

STEPS = 3
TOL = 1e-3
PROMPT = "put the hat from image 2 on the person in image 1"


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def src_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir


@pytest.fixture(scope="module")
def model_dir(tiny_converted_dir):
    """The tiny pipeline converted by convert/pipeline.py (float32)."""
    return tiny_converted_dir


@pytest.fixture(scope="module")
def torch_pipe(src_dir):
    return FluxKontextPipeline.from_pretrained(src_dir, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def jax_pipe(model_dir):
    return sampler.load_pipeline(model_dir, jnp.float32)


@pytest.fixture(scope="module")
def lora_file(peft_lora_file):
    return peft_lora_file


def _noise(n, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((n, (h // 16) * (w // 16), 16)).astype(np.float32)


# One output size and 24 reference tokens in every single-prompt test, so the jitted loop compiles once.
H, W = 48, 64
REF1 = (96, 64)  # (w, h) -> 6 x 4 = 24 tokens
REFS = {2: [(64, 48), (64, 48)], 3: [(64, 48), (32, 48), (32, 48)]}  # 12 + 12, 12 + 6 + 6 tokens


def _torch_run(pipe, prompt, image, h, w, latents, **kw):
    out = pipe(image=image, prompt=prompt, height=h, width=w, num_inference_steps=STEPS, guidance_scale=3.5,
               latents=torch.from_numpy(latents), output_type="np", max_area=h * w, _auto_resize=False, **kw)
    return out.images


def _ours(pipe, prompts, refs, latents, **kw):
    kw.setdefault("progress", False)
    return pipe(prompts, refs, height=H, width=W, steps=STEPS, guidance=3.5, latents=latents, auto_resize=False,
                max_area=H * W, **kw)


def test_one_reference_matches_kontext_pipeline(torch_pipe, jax_pipe):
    ref = _image(1, *REF1)
    lat = _noise(1, H, W)
    want = _torch_run(torch_pipe, PROMPT, ref, H, W, lat)
    got = _ours(jax_pipe, PROMPT, [[ref]], lat)
    assert got.shape == want.shape == (1, H, W, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # the kontext scheme gives the same ids for one reference; progress ticks once per step from inside the scan
    got_k = _ours(jax_pipe, PROMPT, [ref], lat, scheme="kontext", progress=True)
    np.testing.assert_allclose(got_k, want, rtol=0, atol=TOL)
    assert jax_pipe._progress.count == STEPS


def test_batch_of_prompts_and_images_with_true_cfg(torch_pipe, jax_pipe):
    ref = _image(2, *REF1)
    prompts = ["a red ball on a blue table", "turn the background white"]
    neg = "make it look like a painting"
    lat = _noise(4, H, W, seed=1)
    want = _torch_run(torch_pipe, prompts, ref, H, W, lat, num_images_per_prompt=2, true_cfg_scale=2.5,
                      negative_prompt=[neg, neg])
    got = _ours(jax_pipe, prompts, [ref], lat, seeds=[0, 1], true_cfg_scale=2.5, negative_prompt=neg)
    assert got.shape == (4, H, W, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert np.abs(got[0] - got[2]).max() > 1e-2  # prompts matter


def test_no_reference_generation_matches_kontext_pipeline(torch_pipe, jax_pipe):
    lat = _noise(1, H, W, seed=4)
    want = _torch_run(torch_pipe, "a green square and a yellow circle", None, H, W, lat)
    got = _ours(jax_pipe, "a green square and a yellow circle", None, lat)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_lora_matches_kontext_pipeline(torch_pipe, jax_pipe, lora_file):
    ref = _image(3, *REF1)
    lat = _noise(1, H, W, seed=2)
    base = _torch_run(torch_pipe, PROMPT, ref, H, W, lat)
    torch_pipe.load_lora_weights(lora_file.parent, weight_name=lora_file.name, adapter_name="test")
    try:
        want = _torch_run(torch_pipe, PROMPT, ref, H, W, lat)
    finally:
        torch_pipe.delete_adapters("test")
    assert np.abs(want - base).max() > 1e-2, "test LoRA too weak to be detected"
    model = nnx.clone(jax_pipe.transformer)
    meta = attach_lora(model, lora_file, scale=1.0)
    assert meta["rank"] == 4 and meta["alpha"] == 8
    got = _ours(jax_pipe, PROMPT, [[ref]], lat, transformer=model)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    np.testing.assert_allclose(_ours(jax_pipe, PROMPT, [[ref]], lat), base, rtol=0, atol=TOL)  # pipe untouched


def _dreamomni2_reference(pipe, prompt, images, h, w, latents, scheme):
    """Transcription of the DreamOmni2 pipeline (prepare_latents loop: domain i+1, cumulative w_offset) with the
    diffusers components; ``scheme="kontext"`` drops the offset."""
    dev, dtype = torch.device("cpu"), torch.float32
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=dev,
                                                      max_sequence_length=512)
        c = pipe.transformer.config.in_channels // 4
        tp_latents, tp_ids, h_offset, w_offset = [], [], 0, 0
        for i, img in enumerate(images):
            ih, iw = img.height // 16 * 16, img.width // 16 * 16
            x = pipe.image_processor.preprocess(pipe.image_processor.resize(img, ih, iw), ih, iw)
            z = pipe._encode_vae_image(image=x.to(dev, dtype), generator=None)
            lh, lw = z.shape[2:]
            tp_latents.append(pipe._pack_latents(z, 1, c, lh, lw))
            ids = pipe._prepare_latent_image_ids(1, lh // 2, lw // 2, dev, dtype)
            ids[..., 0] = i + 1
            if scheme == "dreamomni2":
                ids[..., 2] += w_offset
            tp_ids.append(ids)
            h_offset += lh // 2
            w_offset += lw // 2
        image_latents = torch.cat(tp_latents, dim=1)
        lat = torch.from_numpy(latents)
        img_ids = torch.cat([pipe._prepare_latent_image_ids(1, h // 16, w // 16, dev, dtype), *tp_ids], dim=0)
        s = pipe.scheduler.config
        mu = calculate_shift(lat.shape[1], s.base_image_seq_len, s.max_image_seq_len, s.base_shift, s.max_shift)
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
        pipe.scheduler.set_begin_index(0)
        guidance = torch.full([1], 3.5, dtype=torch.float32)
        for t in pipe.scheduler.timesteps:
            out = pipe.transformer(hidden_states=torch.cat([lat, image_latents], dim=1),
                                   timestep=t.expand(1).to(dtype) / 1000, guidance=guidance,
                                   pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                   img_ids=img_ids, return_dict=False)[0][:, : lat.shape[1]]
            lat = pipe.scheduler.step(out, t, lat, return_dict=False)[0]
        z = pipe._unpack_latents(lat, h, w, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="np")


@pytest.mark.parametrize("n_refs", [2, 3])
def test_multi_reference_matches_dreamomni2_transcription(torch_pipe, jax_pipe, n_refs):
    refs = [_image(10 + i, *wh) for i, wh in enumerate(REFS[n_refs])]
    lat = _noise(1, H, W, seed=3)
    results = {}
    for scheme in ("dreamomni2", "kontext"):
        want = _dreamomni2_reference(torch_pipe, PROMPT, refs, H, W, lat, scheme)
        results[scheme] = got = _ours(jax_pipe, PROMPT, [refs], lat, scheme=scheme)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=scheme)
    assert np.abs(results["dreamomni2"] - results["kontext"]).max() > 1e-3, "column offsets had no effect"


@pytest.mark.parametrize("wh", [(300, 200), (200, 300), (512, 512), (1000, 330), (97, 203)])
def test_auto_resize_snaps_like_kontext(wh):
    img = _image(5, *wh)
    aspect = wh[0] / wh[1]
    _, pw, ph = min((abs(aspect - a / b), a, b) for a, b in PREFERRED_KONTEXT_RESOLUTIONS)
    pw, ph = pw // 16 * 16, ph // 16 * 16
    proc = VaeImageProcessor(vae_scale_factor=16)
    want = proc.preprocess(proc.resize(img, ph, pw), ph, pw)[0].permute(1, 2, 0).numpy()
    got = sampler.reference_pixels(img, auto_resize=True)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert sampler.reference_pixels(img, auto_resize=False).shape == (wh[1] // 16 * 16, wh[0] // 16 * 16, 3)
    arr = np.asarray(img)
    np.testing.assert_allclose(sampler.reference_pixels(arr, auto_resize=True), want, atol=1e-6)


def test_output_size_follows_kontext_max_area():
    # Kontext fits the requested size to max_area and floors to 16: 672x1568 -> 656x1552.
    assert sampler.output_size(672, 1568, None, 1024 ** 2) == (656, 1552)
    assert sampler.output_size(None, None, (48, 80), None) == (48, 80)
    assert sampler.output_size(None, None, None, 1024 ** 2) == (1024, 1024)
    with pytest.raises(ValueError, match="both height and width"):
        sampler.output_size(64, None, None, None)


def test_default_output_size_by_task(jax_pipe):
    """Editing: the source's (snapped) size fitted to max_area, as DreamOmni2 edits at the source's size;
    generation: 1024² fitted to max_area (DreamOmni2 inference_gen.py, Kontext without an image), references or
    not."""
    ref = _image(4, 96, 64)  # snapped to 1248x832
    area = 64 * 64
    kw = dict(steps=1, max_area=area, progress=False)
    edit = jax_pipe(PROMPT, [ref], ids_dtype="bfloat16", **kw)  # model.ids_dtype: float32 ids reach the model
    gen = jax_pipe(PROMPT, [ref], task="generation", **kw)
    assert edit.shape[1:3] == sampler.output_size(None, None, (832, 1248), area) == (48, 64)
    assert gen.shape[1:3] == sampler.output_size(None, None, None, area) == (64, 64)
    assert np.isfinite(edit).all() and edit.std() > 0
    with pytest.raises(ValueError, match="task"):
        jax_pipe(PROMPT, [ref], task="edit", **kw)


def test_clear_errors(jax_pipe, tmp_path):
    with pytest.raises(BadInput, match="not found.*missing.png"):
        jax_pipe(PROMPT, [str(tmp_path / "missing.png")], height=32, width=32, steps=1)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(BadInput, match="cannot read image.*bad.png"):
        jax_pipe(PROMPT, [str(bad)], height=32, width=32, steps=1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        jax_pipe(PROMPT, [np.full((32, 32, 3), 2.0, np.float32)], height=32, width=32, steps=1)
    with pytest.raises(ValueError, match="latents must have shape"):
        jax_pipe(PROMPT, [], height=32, width=32, steps=1, latents=np.zeros((1, 5, 16), np.float32))
    from safetensors.numpy import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 7), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((32, 2), np.float32)}, wrong)
    with pytest.raises(LoraFileError, match="do not fit|shape"):
        attach_lora(nnx.clone(jax_pipe.transformer), wrong)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"transformer.foo.lora_A.weight": np.zeros((2, 7), np.float32),
               "transformer.foo.lora_B.weight": np.zeros((32, 2), np.float32)}, unknown)
    with pytest.raises(LoraFileError, match="foo"):
        attach_lora(nnx.clone(jax_pipe.transformer), unknown)


def test_lora_scale_and_training_checkpoint(jax_pipe, lora_file, tmp_path):
    from dreamomni2_jax.checkpoint.store import open_run
    from dreamomni2_jax.lora.layers import LoRAParam, lora_metadata, lora_state

    full = nnx.clone(jax_pipe.transformer)
    attach_lora(full, lora_file, scale=1.0)
    half = nnx.clone(jax_pipe.transformer)
    attach_lora(half, lora_file, scale=0.5)
    a, b = lora_state(full), lora_state(half)
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]) * (0.5 if k.endswith("lora_B") else 1.0),
                                   rtol=1e-6, atol=1e-7)
    ckpt = open_run(tmp_path / "run", every_steps=1, async_save=False, adapter=lora_metadata(full))
    ckpt.save(7, {"lora": nnx.state(full, LoRAParam).to_pure_dict()}, force=True)
    ckpt.close()
    from_ckpt = nnx.clone(jax_pipe.transformer)
    meta = attach_lora(from_ckpt, tmp_path / "run", scale=1.0)
    assert meta["step"] == 7
    c = lora_state(from_ckpt)
    assert sorted(c) == sorted(a)
    for k in a:
        np.testing.assert_allclose(np.asarray(c[k]), np.asarray(a[k]), rtol=1e-6, atol=1e-7)
    assert lora_metadata(from_ckpt)["alpha"] == lora_metadata(full)["alpha"]


def test_cli(model_dir, lora_file, tmp_path, capsys):
    import json
    import runpy

    main = runpy.run_path("scripts/sample.py")["main"]
    ref = tmp_path / "ref.png"
    _image(3, *REF1).save(ref)
    out = tmp_path / "out.png"
    assert main(["--model", str(model_dir), "--prompt", PROMPT, "--ref", str(tmp_path / "nope.png"),
                 "--out", str(out)]) == 2
    assert "nope.png" in capsys.readouterr().err
    args = ["--model", str(model_dir), "--prompt", PROMPT, "--ref", str(ref), "--out", str(out), "--dtype", "fp32",
            "--height", str(H), "--width", str(W), "--max-area", "0", "--no-auto-resize", "--steps", str(STEPS),
            "--lora", str(lora_file), "--seed", "5", "--num-images", "2", "--no-progress"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    paths = [tmp_path / "out_0.png", tmp_path / "out_1.png"]
    assert report["out"] == [str(p) for p in paths] and report["size"] == [H, W]
    imgs = [np.asarray(Image.open(p)) for p in paths]
    assert imgs[0].shape == (H, W, 3) and np.abs(imgs[0].astype(int) - imgs[1].astype(int)).max() > 10
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli_enhance_rewrites_the_prompt_like_dreamomni2(model_dir, tmp_path, capsys):
    """--enhance: DreamOmni2's inference_edit.py infer_vlm (suffixed instruction, fetch_image'd references,
    greedy) with transformers' processor and model is the reference; Flux gets the answer, never the suffix."""
    import json
    import runpy

    from support import reference_code
    from support.fixtures_data import reference_qwen_processor, save_tiny_qwen_vl
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dreamomni2_jax.cache.enhance import extract_gen

    main = runpy.run_path("scripts/sample.py")["main"]
    qwen = save_tiny_qwen_vl(tmp_path / "qwen")
    ref = tmp_path / "ref.png"
    _image(3, *REF1).save(ref)
    args = ["--model", str(model_dir), "--prompt", PROMPT, "--ref", str(ref), "--out", str(tmp_path / "o.png"),
            "--dtype", "fp32", "--height", str(H), "--width", str(W), "--max-area", "0", "--no-auto-resize",
            "--steps", "1", "--no-progress", "--enhance", str(qwen), "--enhance-max-tokens", "8"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    proc = reference_qwen_processor(qwen)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen).eval()
    messages = reference_code.infer_vlm_messages([str(ref)], PROMPT, " It is editing task.")
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[text], images=[reference_code.fetch_image({"image": str(ref)})], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    answer = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                               clean_up_tokenization_spaces=False)[0]
    assert report["task"] == "editing" and report["prompt"] == extract_gen(answer) != PROMPT
    assert "It is editing task" not in report["prompt"]
    with pytest.raises(SystemExit) as exit_:  # editing without a source image: a usage error
        main(["--model", str(model_dir), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"), "--task", "editing"])
    assert exit_.value.code == 2 and "--task editing needs" in capsys.readouterr().err
