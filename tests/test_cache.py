"""Cache stage: sizes, parsing, real tiny encoders vs direct / PyTorch encodes, bad inputs, resume, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.fixtures_data import SPECS, tiny_config, write_folder, write_jsonl
from dreamomni2_jax.cache import inputs
from dreamomni2_jax.cache.records import CacheError, decode_record, encode_record, load_index
from dreamomni2_jax.cache.stage import build_cache
from dreamomni2_jax.images.sizes import PREFERRED_KONTEXT_RESOLUTIONS, editing_size, reference_size, target_size
from dreamomni2_jax.images.io import BadInput, open_image, to_pixels

REPO = Path(__file__).resolve().parents[1]


def read_all(cache_dir: Path) -> list[tuple[dict, dict]]:
    """Every record of a cache in index order (read with the ArrayRecord reader directly)."""
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for s in load_index(cache_dir)["shards"]:
        r = ArrayRecordReader(str(cache_dir / s["file"]))
        out += [decode_record(b) for b in r.read(list(range(s["num_records"])))]
        r.close()
    return out


# --------------------------------------------------------------------------- sizes and pixels


def _diffusers_kontext_resolutions() -> list:
    """PREFERRED_KONTEXT_RESOLUTIONS read from the installed diffusers source (importing the pipeline is slow)."""
    import ast
    import importlib.util

    src = Path(importlib.util.find_spec("diffusers").origin).parent / "pipelines" / "flux" / "pipeline_flux_kontext.py"
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PREFERRED_KONTEXT_RESOLUTIONS":
            return ast.literal_eval(node.value)
    raise AssertionError(f"PREFERRED_KONTEXT_RESOLUTIONS not found in {src}")


def test_kontext_resolutions_match_diffusers():
    ref = _diffusers_kontext_resolutions()

    assert PREFERRED_KONTEXT_RESOLUTIONS == list(ref)
    for w, h in [(1024, 1024), (640, 480), (480, 640), (1920, 1080), (300, 900), (2000, 700), (1000, 1001)]:
        # FluxKontextPipeline.__call__ with _auto_resize: closest aspect, then floor to multiple_of=16
        _, rw, rh = min((abs(w / h - pw / ph), pw, ph) for pw, ph in ref)
        assert reference_size(w, h, 1024 * 1024) == (rw // 16 * 16, rh // 16 * 16)


@pytest.mark.parametrize("area", [64 * 64, 96 * 96, 512 * 512])
def test_scaled_sizes_are_multiples_within_budget(area):
    for w, h in [(96, 96), (128, 64), (64, 112), (333, 100), (100, 333)]:
        for size in (reference_size(w, h, area), target_size(w, h, area)):
            assert size[0] % 16 == 0 and size[1] % 16 == 0 and size[0] * size[1] <= area * 1.02
        tw, th = target_size(w, h, area)
        assert abs(np.log((tw / th) / (w / h))) < 0.5


def test_pixels_match_diffusers_image_processor(tmp_path):
    import torch
    from diffusers.image_processor import VaeImageProcessor

    path = write_jsonl(tmp_path)
    img = open_image(str(tmp_path / "img" / "s3_target.png"), "x")
    proc = VaeImageProcessor(vae_scale_factor=8)
    for w, h in [(80, 112), (96, 96), img.size]:
        ref = proc.preprocess(proc.resize(img, h, w), h, w)  # [1, 3, H, W] float32 in [-1, 1]
        ours = to_pixels(img, (w, h))
        np.testing.assert_array_equal(ours, ref[0].permute(1, 2, 0).to(torch.float32).numpy())
    assert path.exists()


def test_both_input_formats_parse_identically(tmp_path):
    recs_j, bad_j = inputs.read_manifest(write_jsonl(tmp_path / "j"))
    recs_f, bad_f = inputs.read_folder(write_folder(tmp_path / "f"))
    assert not bad_j and not bad_f and len(recs_j) == len(recs_f) == len(SPECS)
    for rj, rf, (tsize, rsizes) in zip(recs_j, recs_f, SPECS):
        assert rj.instruction == rf.instruction and rj.line is not None
        assert len(rj.references) == len(rf.references) == len(rsizes)
        for pj, pf in zip((rj.target, *rj.references), (rf.target, *rf.references)):
            assert np.array_equal(np.asarray(Image.open(pj)), np.asarray(Image.open(pf)))
        assert Image.open(rj.target).size == tsize


def test_record_roundtrip_keeps_bfloat16():
    import ml_dtypes

    a = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    arrays, meta = decode_record(encode_record({"a": a, "b": np.ones((2,), np.int32)}, {"k": "v"}))
    assert arrays["a"].dtype == a.dtype and np.array_equal(arrays["a"], a) and meta == {"k": "v"}
    assert arrays["b"].tolist() == [1, 1]


def test_v2_cache_reads_its_t5_embeddings_as_text(tiny_cache, tmp_path):
    """v3 renamed the prompt-embedding key "t5" to the family-neutral "text"; a v2 cache (index version 2, records
    with "t5") is still read, without re-caching, and a v1 cache is still refused."""
    import shutil

    t5 = np.arange(6, dtype=np.float32).reshape(2, 3)
    arrays, _ = decode_record(encode_record({"t5": t5, "pooled": np.ones(3, np.float32)}))
    assert sorted(arrays) == ["pooled", "text"] and np.array_equal(arrays["text"], t5)
    _, _, cache = tiny_cache
    old = tmp_path / "v2"
    shutil.copytree(cache, old)
    index = json.loads((old / "index.json").read_text())
    for version, ok in ((2, True), (1, False), (4, False)):
        (old / "index.json").write_text(json.dumps({**index, "version": version}))
        if ok:
            assert load_index(old)["num_records"] == index["num_records"]
        else:
            with pytest.raises(CacheError, match="re-run scripts/cache.py|not a dreamomni2-cache"):
                load_index(old)


# --------------------------------------------------------------------------- real tiny encoders


def test_cached_latents_equal_direct_vae_encode(tiny_cache, tiny_converted_dir):
    import jax.numpy as jnp

    from dreamomni2_jax.models.vae import encode_images, normalize_latents
    from dreamomni2_jax.convert.loaders import load_vae

    cfg, manifest, cache = tiny_cache
    index = load_index(cache)
    vae = load_vae(tiny_converted_dir / "vae", dtype=jnp.float32)
    recs = read_all(cache)
    assert index["num_records"] == len(recs) == len(SPECS) and index["num_skipped"] == 0
    assert [s["num_records"] for s in index["shards"]] == [4, 2]
    by_shape = {}  # direct encodes batched per shape: (cached latent, pixels)
    for (arrays, meta), entry, (_, rsizes) in zip(recs, index["records"], SPECS):
        assert entry["num_references"] == len(rsizes) == len(meta["references"])
        paths = [meta["target"], *meta["references"]]
        keys = ["target"] + [f"ref{j}" for j in range(len(rsizes))]
        sizes = [entry["target_latent"], *entry["reference_latents"]]
        source = Image.open(paths[1]).size  # SPECS records are editing pairs: target and source share one size
        for j, (p, key, lat) in enumerate(zip(paths, keys, sizes)):
            img = open_image(p, "test")
            size = editing_size(*source, 96 * 96) if j < 2 else reference_size(*img.size, 96 * 96)
            assert list(arrays[key].shape[:2]) == lat == [size[1] // 8, size[0] // 8]
            by_shape.setdefault(size, []).append((arrays[key], to_pixels(img, size)))
        assert meta["line"] == entry["line"] and meta["where"].endswith(f"train.jsonl:{entry['line']}")
    for items in by_shape.values():
        direct = normalize_latents(encode_images(vae, jnp.asarray(np.stack([x for _, x in items]))), vae.config)
        # same numbers up to float summation order (the batch size changes XLA's conv schedule)
        np.testing.assert_allclose(np.stack([z for z, _ in items]), np.asarray(direct), rtol=1e-4, atol=1e-4)


def test_cache_matches_pytorch_reference(tiny_cache, tiny_pipeline_dir):
    """End to end vs diffusers AutoencoderKL (mode, shift/scale) and transformers CLIP/T5 (FluxPipeline prompts)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    _, _, cache = tiny_cache
    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir / "vae").eval()
    clip = CLIPTextModel.from_pretrained(tiny_pipeline_dir / "text_encoder").eval()
    t5 = T5EncoderModel.from_pretrained(tiny_pipeline_dir / "text_encoder_2").eval()
    tok = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer")
    tok2 = T5TokenizerFast.from_pretrained(tiny_pipeline_dir / "tokenizer_2")

    def text_ref(prompt):
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        ids2 = tok2([prompt], padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
        return t5(ids2)[0][0].numpy(), clip(ids, output_hidden_states=False).pooler_output[0].numpy()

    with torch.no_grad():
        for arrays, meta in read_all(cache)[:2]:
            for key, p, (w, h) in zip(["target", "ref0", "ref1"], [meta["target"], *meta["references"]],
                                      meta["pixels"]):
                x = torch.from_numpy(to_pixels(open_image(p, "t"), (w, h))).permute(2, 0, 1)[None]
                z = vae.encode(x).latent_dist.mode()
                z = ((z - vae.config.shift_factor) * vae.config.scaling_factor)[0].permute(1, 2, 0).numpy()
                np.testing.assert_allclose(arrays[key], z, atol=2e-4, rtol=1e-3)
            t5_ref, pooled_ref = text_ref(meta["instruction"])
            np.testing.assert_allclose(arrays["text"], t5_ref, atol=2e-4, rtol=1e-3)
            np.testing.assert_allclose(arrays["pooled"], pooled_ref, atol=2e-4, rtol=1e-3)
        empty, _ = decode_record((cache / "empty_prompt.rec").read_bytes())
        t5_ref, pooled_ref = text_ref("")
        np.testing.assert_allclose(empty["text"], t5_ref, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(empty["pooled"], pooled_ref, atol=2e-4, rtol=1e-3)


def test_folder_input_gives_the_same_cache(tiny_cache, tiny_encoders, tmp_path):
    cfg, _, cache = tiny_cache
    folder = write_folder(tmp_path / "in")
    build_cache(cfg, folder, tmp_path / "cache", tiny_encoders, shard_size=4, progress=False)
    for (a, ma), (b, mb) in zip(read_all(cache), read_all(tmp_path / "cache"), strict=True):
        assert a.keys() == b.keys() and ma["instruction"] == mb["instruction"]
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert mb["line"] is None and Path(mb["where"]).parent == folder


# --------------------------------------------------------------------------- bad inputs


def _corrupt(root, recs):
    (root / "img" / "s1_ref0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return 2, "cannot read image", "s1_ref0.png"


def _missing(root, recs):
    (root / "img" / "s1_target.png").unlink()
    return 2, "not found", "s1_target.png"


def _empty_instruction(root, recs):
    recs[1]["instruction"] = "   "
    return 2, "empty instruction", "s1_target.png"


def _too_many_refs(root, recs):
    recs[1]["references"] = recs[1]["references"] * 2  # 4 > max_refs=3
    return 2, "more than data.max_refs=3", "s1_ref1.png"  # the first reference over the limit


def _too_small(root, recs):
    Image.new("RGB", (40, 20), (1, 2, 3)).save(root / "img" / "s1_ref1.png")
    return 2, "below data.min_image_size=32", "s1_ref1.png"


def _bad_json(root, recs):
    recs[1] = "{not json"
    return 2, "invalid JSON", None


@pytest.mark.parametrize("make_bad", [_corrupt, _missing, _empty_instruction, _too_many_refs, _too_small, _bad_json])
def test_bad_input(make_bad, tmp_path, tiny_encoders):
    root = tmp_path / "in"
    manifest = write_jsonl(root, SPECS[:3])
    recs = [json.loads(x) for x in manifest.read_text().splitlines()]
    line, reason, fname = make_bad(root, recs)
    manifest.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    cfg = tiny_config()
    with pytest.raises(BadInput) as err:
        build_cache(cfg, manifest, tmp_path / "c1", tiny_encoders, shard_size=2, progress=False)
    msg = str(err.value)
    assert f"train.jsonl:{line}" in msg and reason in msg and (fname is None or fname in msg)
    assert not (tmp_path / "c1" / "index.json").exists() and not list((tmp_path / "c1").glob("*.array_record"))

    index = build_cache(cfg, manifest, tmp_path / "c2", tiny_encoders, shard_size=2, skip_bad=True, progress=False)
    assert index["num_records"] == 2 and index["num_skipped"] == 1
    assert [r["line"] for r in index["records"]] == [1, 3]
    (skipped,) = [json.loads(x) for x in (tmp_path / "c2" / "skipped.jsonl").read_text().splitlines()]
    assert skipped["where"].endswith(f"train.jsonl:{line}") and reason in skipped["reason"]
    assert fname is None or skipped["path"].endswith(fname)


def test_folder_orphans_and_gaps_are_reported(tmp_path):
    root = write_folder(tmp_path / "f", SPECS[:2])
    (root / "s1_control_1.png").rename(root / "s1_control_2.png")  # gap: control, control_2
    Image.new("RGB", (64, 64)).save(root / "lonely_control.png")
    (root / "nothing.txt").write_text("orphan instruction")
    recs, bad = inputs.read_folder(root)
    assert [Path(r.target).name for r in recs] == ["s0.png"]
    reasons = sorted(e.reason.split(" ")[0] for e in bad)
    assert len(bad) == 3 and reasons == ["control", "control", "instruction"], [str(e) for e in bad]


# --------------------------------------------------------------------------- resume / atomicity


class _Killed(Exception):
    pass


@pytest.mark.parametrize("when", [("record", 1), ("shard", 0)])
def test_interrupted_run_resumes_to_the_clean_result(when, tmp_path, tiny_encoders):
    manifest = write_jsonl(tmp_path / "in", SPECS[:5])
    cfg = tiny_config()
    clean = build_cache(cfg, manifest, tmp_path / "clean", tiny_encoders, shard_size=2, progress=False)

    def hook(event, shard):
        if (event, shard) == when:
            raise _Killed

    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        build_cache(cfg, manifest, out, tiny_encoders, shard_size=2, progress=False, hook=hook)
    assert not (out / "index.json").exists() and not list(out.glob("*.tmp-*"))
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.array_record", "shard-00000.json"]
    (out / "shard-00001.array_record.tmp-99999").write_bytes(b"partial shard of a killed process")
    calls = []
    resumed = build_cache(cfg, manifest, out, tiny_encoders, shard_size=2, progress=False,
                          hook=lambda e, s: calls.append((e, s)))
    assert ("record", 0) not in calls and ("shard", 1) in calls  # shard 0 was not redone
    assert resumed["records"] == clean["records"] and resumed["shards"] == clean["shards"]
    for (a, ma), (b, mb) in zip(read_all(tmp_path / "clean"), read_all(out), strict=True):
        assert ma == mb and all(np.array_equal(a[k], b[k]) for k in a)
    assert not list(out.glob("*.tmp-*"))


def test_rerun_with_other_settings_is_refused(tiny_cache, tiny_encoders):
    cfg, manifest, cache = tiny_cache
    from support.fixtures_data import with_data

    with pytest.raises(CacheError, match="target_max_area"):
        build_cache(with_data(cfg, target_max_area=64 * 64), manifest, cache, tiny_encoders, shard_size=4,
                    progress=False)
    again = build_cache(cfg, manifest, cache, tiny_encoders, shard_size=4, progress=False)  # all done: no work
    assert again["records"] == load_index(cache)["records"]


# --------------------------------------------------------------------------- CLI


def _config_file(tmp_path, model_path) -> Path:
    p = tmp_path / "cfg.py"
    p.write_text("import sys\nsys.path.insert(0, %r)\nfrom support.fixtures_data import tiny_config\n"
                 "def get_config():\n    return tiny_config(%r)\n" % (str(REPO / "tests"), str(model_path)))
    return p


def test_cli_bad_input_then_skip_bad_on_four_devices(tmp_path, tiny_converted_dir, tiny_encoders):
    import os

    manifest = write_jsonl(tmp_path / "in", [SPECS[0], SPECS[0]])  # one image shape: one compile
    (tmp_path / "in" / "img" / "s0_ref0.png").write_bytes(b"garbage")
    cfg_file = _config_file(tmp_path, tiny_converted_dir)
    cmd = [sys.executable, str(REPO / "scripts" / "cache.py"), "--config", str(cfg_file),
           "--data", str(manifest), "--out", str(tmp_path / "cache"), "--no-progress", "--shard-size", "1",
           "--image-batch", "2"]
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "train.jsonl:1" in bad.stderr and "s0_ref0.png" in bad.stderr, bad.stderr
    assert "--skip-bad" in bad.stderr
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True, cwd=REPO, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "encoders on 4 local devices (image batch 4)" in ok.stderr
    assert "cached 1 records" in ok.stdout and "skipped 1" in ok.stdout
    index = load_index(tmp_path / "cache")
    assert index["num_records"] == 1 and index["records"][0]["line"] == 2
    (skipped,) = (tmp_path / "cache" / "skipped.jsonl").read_text().splitlines()
    assert json.loads(skipped)["line"] == 1
    # the data-parallel (4-device) encode gives the single-device numbers
    (arrays, meta), = read_all(tmp_path / "cache")
    for key, p, size in zip(["target", "ref0"], [meta["target"], *meta["references"]], meta["pixels"]):
        x = to_pixels(open_image(p, "t"), tuple(size))[None]
        np.testing.assert_allclose(arrays[key], tiny_encoders.encode_images(x)[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- instruction enhancer


def test_enhancer_rewrites_with_task_suffix_and_keeps_the_original(tmp_path, tiny_encoders):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from support.fixtures_data import reference_qwen_processor, save_tiny_qwen_vl
    from support import reference_code
    from dreamomni2_jax.cache.enhance import MAX_NEW_TOKENS, QwenEnhancer, extract_gen, vlm_messages

    qwen = save_tiny_qwen_vl(tmp_path / "qwen")
    manifest = write_jsonl(tmp_path / "in", [SPECS[0], SPECS[2]])
    recs = [json.loads(x) for x in manifest.read_text().splitlines()]
    recs[1]["task"] = "generation"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    enhancer = QwenEnhancer(qwen, max_new_tokens=8, device="cpu")
    build_cache(tiny_config(), manifest, tmp_path / "cache", tiny_encoders, shard_size=4, progress=False,
                enhancer=enhancer, enhancer_name=str(qwen))

    proc = reference_qwen_processor(qwen)  # transformers' processor and model: the reference
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen).eval()
    cached = read_all(tmp_path / "cache")
    assert [m["task"] for _, m in cached] == ["editing", "generation"]
    for (arrays, meta), rec, suffix in zip(cached, recs, [" It is editing task.", " It is generation task."]):
        assert meta["instruction_original"] == rec["instruction"]
        paths = [str(tmp_path / "in" / p) for p in rec["references"]]
        # DreamOmni2 inference_edit.py / inference_gen.py: messages, then images through vprocess.fetch_image
        want = reference_code.infer_vlm_messages(paths, rec["instruction"], suffix)
        refs = [reference_code.fetch_image({"image": p}) for p in paths]
        assert refs[0].size == (1024, 1024)  # resizeinput: the Kontext resolution, not the 96x96 file
        messages = vlm_messages(rec["instruction"], meta["task"], len(refs))
        assert messages[0]["content"][-1] == want[0]["content"][-1]
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == proc.apply_chat_template(want, tokenize=False, add_generation_prompt=True)
        ref_inputs = proc(text=[text], images=refs, return_tensors="pt")
        ours = enhancer.inputs(paths, rec["instruction"], meta["task"])
        assert set(ours) == set(ref_inputs) and all(torch.equal(ours[k], ref_inputs[k]) for k in ref_inputs)
        with torch.no_grad():
            out = model.generate(**ref_inputs, do_sample=False, max_new_tokens=8)
        answer = proc.batch_decode(out[:, ref_inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)[0]
        assert meta["instruction"] == extract_gen(answer) != rec["instruction"]
        t5, pooled = tiny_encoders.encode_text([meta["instruction"]])
        np.testing.assert_allclose(arrays["text"], t5[0], atol=1e-5)
        np.testing.assert_allclose(arrays["pooled"], pooled[0], atol=1e-5)
    assert extract_gen("noise <gen> a cat </gen> tail") == "a cat" and extract_gen(" plain ") == "plain"
    assert MAX_NEW_TOKENS == reference_code.INFER_VLM_MAX_NEW_TOKENS
    assert QwenEnhancer.__init__.__defaults__[0] == MAX_NEW_TOKENS


def test_vlm_image_is_dreamomni2_fetch_image(tmp_path):
    from support import reference_code
    from dreamomni2_jax.cache.enhance import vlm_image

    rng = np.random.default_rng(0)
    for size, mode in [((300, 170), "RGB"), ((120, 160), "RGBA"), ((1024, 1024), "RGB"), ((90, 400), "L")]:
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), np.uint8)
        img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
        p = tmp_path / f"{mode}_{size[0]}.png"
        img.save(p)
        want = reference_code.fetch_image({"image": str(p)})
        for got in (vlm_image(str(p)), vlm_image(Image.open(p))):
            assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))
