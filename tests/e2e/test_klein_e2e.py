"""FLUX.2 [klein] end to end, on a tiny random ``Flux2KleinPipeline`` folder written by diffusers:
convert/pipeline.py -> scripts/cache.py (cached latents / prompt embeddings = the pipeline's) -> scripts/train.py
(kill -9 after a checkpoint, resume: the same losses bit for bit; validation sampling) ->
convert/export_lora.py -> diffusers ``load_lora_weights`` (same transformer output as ours) and
scripts/sample.py with 2 references. The model family is read from the converted folder by every command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
import pytest
from support.compile_cache import persistent_compile_cache
import torch

from dreamomni2_jax.checkpoint import store as C

REPO = Path(__file__).resolve().parents[2]
KILL_AFTER_SAVE = REPO / "tests" / "support" / "kill_after_save.py"  # run as a script: SIGKILL after step N's save
CONFIG = REPO / "configs" / "klein_demo.py"
SPECS = [((64, 64), [(64, 64), (64, 48)])] * 4  # one batch shape: the train step compiles once
STEPS = 4
MAX_LEN = 32  # configs/klein_demo.py data.max_sequence_length
LAYERS = (1, 2, 3)  # the tiny Qwen3's out layers (text_klein.out_layers(4))


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{Path(name).stem}", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Persistent XLA cache shared by this module's runs and its subprocess (they compile the same step)."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache_klein")) as path:
        yield path


@pytest.fixture(scope="module")
def chain(tmp_path_factory, compile_cache):
    """Source folder, converted folder and cache under one root (``configs/klein_demo.py`` paths)."""
    from dreamomni2_jax.testing.tiny_flux1 import write_jsonl
    from dreamomni2_jax.testing.tiny_klein import build_klein_pipeline

    root = tmp_path_factory.mktemp("klein_e2e")
    old = os.environ.get("DREAMOMNI2_DEMO_OUT")
    os.environ["DREAMOMNI2_DEMO_OUT"] = str(root)  # the config's model / cache / validation image paths
    src = build_klein_pipeline(root / "src", seed=0)
    assert _script("convert/pipeline.py")(["--src", str(src), "--out", str(root / "model"), "--dtype", "fp32",
                                           "--no-progress"]) == 0
    write_jsonl(root / "data", specs=SPECS)
    assert _script("scripts/cache.py")(["--config", str(CONFIG), "--data", str(root / "data" / "train.jsonl"),
                                        "--out", str(root / "cache"), "--no-progress"]) == 0
    yield root
    if old is None:
        os.environ.pop("DREAMOMNI2_DEMO_OUT", None)
    else:
        os.environ["DREAMOMNI2_DEMO_OUT"] = old


@pytest.fixture(scope="module")
def torch_pipe(chain):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(chain / "src", torch_dtype=torch.float32)


def _train_argv(run: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--set", f"train.run_dir={run}", "--set", f"train.steps={STEPS}",
            "--set", "checkpoint.every_steps=2", "--set", f"sample.every_steps={STEPS}", "--no-progress", *extra]


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def straight(chain):
    run = chain / "straight"
    assert _script("scripts/train.py")(_train_argv(run)) == 0
    return run


def test_cache_holds_the_pipelines_latents_and_prompt_embeds(chain, torch_pipe):
    from PIL import Image

    from dreamomni2_jax.cache.records import _read_first, load_index
    from dreamomni2_jax.cache.stage import _resized
    from dreamomni2_jax.layout.ids_flux1 import pack_latents

    index = load_index(chain / "cache")
    first = _read_first(chain / "cache" / index["shards"][0]["file"])
    rec0 = index["records"][0]
    assert index["pooled_dim"] == 0 and index["text_shape"] == [MAX_LEN, 96]
    instruction = json.loads((chain / "data" / "train.jsonl").read_text().splitlines()[0])["instruction"]
    with torch.no_grad():
        want_text, _ = torch_pipe.encode_prompt(instruction, device=torch.device("cpu"), max_sequence_length=MAX_LEN,
                                                text_encoder_out_layers=LAYERS)
        h, w = (8 * s for s in rec0["target_latent"])
        px = _resized(Image.open(chain / "data" / rec0["target"]).convert("RGB"), (w, h))
        x = torch.from_numpy(np.asarray(px, np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)[None]
        want_lat = torch_pipe._encode_vae_image(x, None)  # [1, 4C, h/16, w/16], normalised
    want_tokens = want_lat.reshape(1, want_lat.shape[1], -1).permute(0, 2, 1).numpy()
    got_tokens = np.asarray(pack_latents(np.asarray(first["target"], np.float32)[None]))
    scale = np.abs(want_tokens).max()
    assert np.abs(got_tokens - want_tokens).max() <= 1e-4 * scale
    np.testing.assert_allclose(np.asarray(first["text"], np.float32), want_text[0].numpy(), rtol=0,
                               atol=1e-4 * float(want_text.abs().max()))
    assert first["pooled"].shape == (0,)
    from dreamomni2_jax.data.stream import ModelDims  # synthetic batches of a klein folder: its transformer's sizes

    assert ModelDims.from_model_dir(chain / "model") == ModelDims(latent_channels=4, text_dim=96, pooled_dim=0)


def test_train_kill9_then_resume_is_exact_and_validates(chain, straight, compile_cache):
    want = _losses(straight)
    assert sorted(want) == list(range(1, STEPS + 1)) and all(np.isfinite(list(want.values())))
    assert (straight / "samples" / f"step_{STEPS:06d}.png").is_file()  # validation sampling with the klein sampler
    run = chain / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run([sys.executable, str(KILL_AFTER_SAVE), "2", *_train_argv(run)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert C.complete_steps(run / "checkpoints") == [2]
    assert _script("scripts/train.py")(_train_argv(run)) == 0  # resumes from checkpoint 2 by itself
    got = _losses(run)
    assert sorted(got) == [1, 3, 4]  # step 2 was dispatched but not logged before the kill
    assert got == {k: want[k] for k in got}  # bitwise


def test_exported_lora_loads_in_diffusers_with_the_same_output(chain, straight, torch_pipe, tmp_path):
    from dreamomni2_jax.layout import ids_klein as P2
    from dreamomni2_jax.convert.loaders import load_flux2
    from dreamomni2_jax.lora.attach import attach_lora

    out = tmp_path / "pytorch_lora_weights.safetensors"
    assert _script("convert/export_lora.py")(["--ckpt", str(straight), "--out", str(out),
                                                     "--dtype", "fp32"]) == 0
    rng = np.random.default_rng(0)
    c = torch_pipe.transformer.config
    n_img, n_txt = 4 + 6, 7
    hidden = rng.standard_normal((1, n_img, c.in_channels)).astype(np.float32)
    text = rng.standard_normal((1, n_txt, c.joint_attention_dim)).astype(np.float32)
    img_ids = np.concatenate([P2.target_ids(4, 4), P2.reference_ids([(4, 6)])])[None]
    txt_ids = P2.text_ids(n_txt)[None]
    t = np.array([0.7], np.float32)

    def theirs():
        with torch.no_grad():
            return torch_pipe.transformer(hidden_states=torch.from_numpy(hidden),
                                          encoder_hidden_states=torch.from_numpy(text), timestep=torch.from_numpy(t),
                                          img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
                                          guidance=None, return_dict=False)[0].numpy()

    base = theirs()
    torch_pipe.load_lora_weights(str(out))
    try:
        want = theirs()
    finally:
        torch_pipe.unload_lora_weights()
    # the kohya/BFL export names the run's model (FLUX.2, not the FLUX.1 names its attention modules share) and
    # diffusers' FLUX.2 kohya converter loads it to the same output
    kohya = tmp_path / "comfyui_kohya.safetensors"
    assert _script("convert/export_lora.py")(["--ckpt", str(straight), "--out", str(kohya), "--dtype", "fp32",
                                              "--format", "kohya"]) == 0
    with safe_open(str(kohya), "np") as f:
        assert f.metadata()["ss_base_model_version"] == "flux2"
    torch_pipe.load_lora_weights(str(kohya))
    try:
        via_kohya = theirs()
    finally:
        torch_pipe.unload_lora_weights()
    np.testing.assert_allclose(via_kohya, want, rtol=0, atol=1e-5 * np.abs(want).max())
    model = load_flux2(chain / "model" / "transformer", dtype=jnp.float32)
    meta = attach_lora(model, out)
    assert meta["rank"] == 4 and len(meta["targets"]) == 10
    got = np.asarray(model(jnp.asarray(hidden), jnp.asarray(text), jnp.asarray(t), jnp.asarray(img_ids),
                           jnp.asarray(txt_ids)))
    err = np.abs(got - want).max()
    assert err <= 1e-4 * np.abs(want).max()
    assert np.abs(want - base).max() > 20 * err  # the LoRA changes the output well beyond the error


def test_sample_script_with_two_references_and_the_lora(chain, straight, tmp_path):
    from PIL import Image

    out = tmp_path / "sample.png"
    refs = [chain / "data" / "img" / f"s1_ref{j}.png" for j in range(2)]
    assert _script("scripts/sample.py")(["--model", str(chain / "model"), "--prompt", "put the hat on the person",
                                         *[a for r in refs for a in ("--ref", str(r))], "--lora", str(straight),
                                         "--steps", "2", "--guidance", "4.0", "--dtype", "fp32", "--no-progress",
                                         "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 3) and img.std() > 0  # the first reference's size (klein default)
