"""Export the LoRA of a training checkpoint as a diffusers (or kohya/ComfyUI) safetensors file.

    python convert/export_lora.py --ckpt RUN_OR_CKPT_DIR [--step N] --out pytorch_lora_weights.safetensors \
        [--dtype bf16|fp16|fp32] [--format diffusers|kohya] [--ema]

``--ckpt``: a run directory, its ``checkpoints/`` folder or one step folder (latest complete step by default).
diffusers output loads with ``FluxKontextPipeline.load_lora_weights`` (rank / alpha / targets in the file's
``lora_adapter_metadata``); kohya output uses BFL module names with fused q/k/v (ComfyUI, sd-scripts). A DoRA
run (``lora.variant=dora``) writes peft's ``lora_magnitude_vector`` keys and ``use_dora: true`` (diffusers format
only; kohya is refused). The kohya/BFL names are the trained model's (FLUX.1 or FLUX.2, from the run's
``model.path``).
``--ema``: the EMA of the adapters (``train.ema_decay`` > 0) instead of the adapters; a ``schedule_free_adamw`` run
exports its evaluation point. Only the adapters are read; the base model is not needed. Written to a temp file and renamed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dreamomni2_jax.checkpoint.store import load_lora, read_config
from dreamomni2_jax.utils.dtypes import SHORT
from dreamomni2_jax.lora.files import FORMATS, save_lora_file
from dreamomni2_jax import families
from dreamomni2_jax import cli


def run_schema(step_dir: str | Path) -> str | None:
    """The module schema (``flux`` / ``flux2``) of the model the run trained, from the family of its saved
    ``model.path``; None when that folder is not on this machine (the kohya names then follow the adapters'
    modules: the first schema declaring all of them)."""
    model = read_config(step_dir).model.path
    return families.for_path(model).schema if model and Path(model).exists() else None


def export(ckpt: str, out: str, step: int | None = None, dtype: str = "bf16", format: str = "diffusers",
           ema: bool = False) -> dict:
    """Export and return a summary ``{"out", "step", "rank", "alpha", "modules", "format", "dtype", "ema"}``."""
    flat, meta = load_lora(ckpt, step, ema=ema)
    extra = {"dreamomni2_checkpoint": json.dumps({"step_dir": meta["step_dir"], "step": meta["step"], "ema": ema})}
    path = save_lora_file(out, flat, meta["alpha"], format=format, dtype=dtype, extra_metadata=extra,
                          schema=run_schema(meta["step_dir"]))
    return {"out": str(path), "step": meta["step"], "rank": meta["rank"], "alpha": meta["alpha"],
            "modules": len(meta["targets"]), "format": format, "dtype": dtype, "ema": ema}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ folder, or a step folder")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    ap.add_argument("--out", required=True, help="output .safetensors file (not a folder)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(SHORT), help="tensor dtype in the file")
    ap.add_argument("--format", default="diffusers", choices=FORMATS, help="key layout")
    ap.add_argument("--ema", action="store_true", help="export the EMA of the adapters (train.ema_decay > 0)")
    args = ap.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on opening a run read-only are noise here

    def run(_argv) -> int:
        if Path(args.out).is_dir():
            raise cli.UserError(f"--out {args.out} is a folder; give the .safetensors file to write")
        print(json.dumps(export(args.ckpt, args.out, args.step, args.dtype, args.format, args.ema)))
        return 0

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
