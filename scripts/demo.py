"""End-to-end demo on a tiny random model, CPU only (the README's `make demo`).

    python scripts/demo.py --out demo_out
    python scripts/demo.py --family klein --out demo_klein_out     # FLUX.2 [klein] (`make demo-klein`)

Writes a tiny random Flux Kontext (or ``Flux2KleinPipeline``) model folder in the real diffusers layout (configs +
safetensors + tokenizers) and a small drawn-shape dataset with 1-3 references per sample,
then runs the production chain with `configs/demo.py` (`configs/klein_demo.py`); every command after the
conversion reads the model family from the converted folder:

    convert/pipeline.py -> scripts/cache.py -> scripts/train.py (preempted by SIGTERM after a
    checkpoint, then resumed) -> convert/export_lora.py (diffusers + kohya) -> scripts/sample.py

The same commands with `configs/tpu_v5.py` and a real model folder are the production path.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
PREEMPT_AFTER = 10  # metrics lines before the demo sends SIGTERM (a checkpoint is saved every 5 steps)


def _cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


# --family -> (tiny model builder module, config, sample size in pixels)
FAMILIES = {"kontext": ("dreamomni2_jax.testing.tiny_flux1", "configs/demo.py", 128),
            "klein": ("dreamomni2_jax.testing.tiny_klein", "configs/klein_demo.py", 64)}
DEMO_ENV = "DREAMOMNI2_DEMO_OUT"  # configs/demo.py puts its paths (validation references, ...) under it


def run(*args: str) -> None:
    print("\n$ " + " ".join(["python", *args]), flush=True)
    subprocess.run(_cmd(*args), check=True, cwd=ROOT)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_with_preemption(train_args: list[str], run_dir: Path) -> None:
    """Start training, send SIGTERM once PREEMPT_AFTER steps are logged, then resume with the same command."""
    print("\n$ " + " ".join(["python", *train_args]) + "   # preempted with SIGTERM after a few steps", flush=True)
    proc = subprocess.Popen(_cmd(*train_args), cwd=ROOT)
    deadline = time.time() + 900
    while proc.poll() is None and len(_metrics(run_dir)) < PREEMPT_AFTER and time.time() < deadline:
        time.sleep(0.5)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"training exited with {rc} (expected a clean save-and-exit on SIGTERM)")
    done = len(_metrics(run_dir))
    ckpts = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    print(f"-- preempted after {done} steps; checkpoints on disk: {ckpts}", flush=True)
    if done >= STEPS:
        return
    run(*train_args)  # same command: resumes from the latest checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="demo folder (relative to the repo root)")
    ap.add_argument("--fresh", action="store_true", help="delete the demo folder first")
    ap.add_argument("--family", default="kontext", choices=FAMILIES, help="tiny model to run the chain on")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve()
    os.environ[DEMO_ENV] = str(out)  # inherited by every command below
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    hf_model, model, data, cache, run_dir = (out / n for n in ("hf_model", "model", "data", "cache", "run"))
    lora_dir = out / "lora"
    # Stand-ins for a download: tiny random model (real diffusers layout) and a drawn-shape dataset.
    builder, config, size = FAMILIES[args.family]
    if not hf_model.exists():
        run("-m", builder, str(hf_model), "--seed", "0")
    if not (data / "train.jsonl").exists():
        from dreamomni2_jax.testing.tiny_flux1 import write_jsonl

        write_jsonl(data)
        print(f"-- wrote {data / 'train.jsonl'} (6 samples, 1-3 references each)")

    if args.family == "kontext":  # scripts/layout.py describes the FLUX.1 3-axis ids
        run("scripts/layout.py", "--config", config, "--refs", "3")
    run("convert/pipeline.py", "--src", str(hf_model), "--out", str(model), "--dtype", "fp32")
    common = ["--config", config, "--set", f"model.path={model}"]
    run("scripts/cache.py", *common, "--data", str(data / "train.jsonl"), "--out", str(cache))

    shutil.rmtree(run_dir, ignore_errors=True)  # the demo trains from scratch each time
    train_args = ["scripts/train.py", *common, "--set", f"data.cache_dir={cache}", "--set", f"train.run_dir={run_dir}",
                  "--set", f"train.steps={STEPS}", "--no-progress"]
    train_with_preemption(train_args, run_dir)

    lora_dir.mkdir(exist_ok=True)
    diffusers_lora, kohya_lora = lora_dir / "pytorch_lora_weights.safetensors", lora_dir / "comfyui_kohya.safetensors"
    run("convert/export_lora.py", "--ckpt", str(run_dir), "--out", str(diffusers_lora))
    run("convert/export_lora.py", "--ckpt", str(run_dir), "--format", "kohya", "--out", str(kohya_lora))

    sample = out / "sample.png"
    refs = sorted((data / "img").glob("s1_ref*.png"))
    run("scripts/sample.py", "--model", str(model), "--prompt", "put the hat from image 2 on the person in image 1",
        *[a for r in refs for a in ("--ref", str(r))], "--lora", str(diffusers_lora), "--steps", "4",
        "--height", str(size), "--width", str(size), "--max-area", str(size * size), "--ref-area", str(size * size),
        "--seed", "0", "--dtype", "fp32", "--out", str(sample))

    losses = [m["loss"] for m in _metrics(run_dir)]
    print(f"\n== demo finished in {time.time() - t0:.0f} s ==")
    print(f"tiny diffusers model   {hf_model}")
    print(f"dataset (JSONL)        {data / 'train.jsonl'}")
    print(f"converted model        {model}")
    print(f"cache (ArrayRecord)    {cache}")
    print(f"run (ckpts, metrics)   {run_dir}   ({len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    print(f"validation samples     {run_dir / 'samples'}")
    print(f"LoRA (diffusers)       {diffusers_lora}")
    print(f"LoRA (kohya/ComfyUI)   {kohya_lora}")
    print(f"sample with the LoRA   {sample}")
    return 0


def _main_or_error(argv=None) -> int:
    try:
        return main(argv)
    except subprocess.CalledProcessError as e:  # the failing command already printed its own message
        print(f"error: demo step failed (exit code {e.returncode}): {' '.join(map(str, e.cmd[1:]))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main_or_error())
