"""Sample with Flux Kontext / DreamOmni2 (+ optional LoRA): editing or generation from several reference images.

    python scripts/sample.py --model CONVERTED_DIR --prompt "..." --ref a.png [--ref b.png ...] --out out.png \
        [--lora FILE_OR_CHECKPOINT_DIR] [--lora-scale 1.0] [--steps 28] [--guidance 3.5] [--seed 0] \
        [--height H --width W] [--scheme dreamomni2|kontext] [--true-cfg 1.0 --negative-prompt ""] \
        [--num-images N] [--no-auto-resize] [--max-area PIXELS] [--dtype bf16|fp32] [--task editing|generation] \
        [--enhance QWEN2_5_VL_DIR]

References are snapped to the Kontext preferred resolutions (``--no-auto-resize``: only floored to multiples of
16). The output size defaults to the source's (first reference's) for editing (the default with references), and
to 1024x1024 for generation (``--task generation``, the default without references), as DreamOmni2's
inference_edit.py / inference_gen.py. ``--num-images N`` uses seeds ``seed .. seed+N-1`` and writes
``out_0.png .. out_{N-1}.png``. ``--lora`` takes a diffusers/PEFT or kohya safetensors file or a training run /
checkpoint folder. ``--enhance`` rewrites the prompt with DreamOmni2's Qwen2.5-VL first, as its scripts do: the
VLM sees the references and the prompt followed by " It is editing task." / " It is generation task."; Flux gets
the VLM's answer (the task suffix is never part of the Flux prompt). Needs torch (``pip install .[vlm]``).

A FLUX.2 [klein] folder (the family recorded by ``convert/pipeline.py``) samples like ``Flux2KleinPipeline``:
references only capped at 1024² and centre-cropped to multiples of 16, the output at the first reference's size
(else 1024²), ``--guidance`` = classifier-free guidance against ``--negative-prompt`` (default empty);
``--scheme``, ``--true-cfg``, ``--max-area``, ``--ref-area`` and ``--no-auto-resize`` are FLUX.1 options.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

DTYPES = ("bf16", "fp32")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="converted model folder (convert/pipeline.py) or diffusers folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--ref", action="append", default=[], help="reference image (repeat, in order)")
    ap.add_argument("--out", required=True, help="output PNG")
    ap.add_argument("--lora", default=None, help="LoRA safetensors (diffusers/kohya) or training checkpoint folder")
    ap.add_argument("--lora-scale", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--scheme", default="dreamomni2", choices=("dreamomni2", "kontext"))
    ap.add_argument("--true-cfg", type=float, default=1.0, help="> 1 enables true CFG with --negative-prompt")
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--no-auto-resize", action="store_true", help="keep reference sizes (floored to 16)")
    ap.add_argument("--max-area", type=int, default=1024 ** 2, help="output area budget (Kontext); 0 = none")
    ap.add_argument("--ref-area", type=int, default=1024 ** 2,
                    help="reference area: 1024^2 gives the exact Kontext resolutions; smaller scales them down")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--ids-dtype", default="int32", choices=("int32", "bfloat16"),
                    help="bfloat16: round position ids like the reference bf16 pipelines (bit-level parity only)")
    ap.add_argument("--task", default=None, choices=("editing", "generation"),
                    help="default: editing with --ref, generation without")
    ap.add_argument("--enhance", default="", metavar="QWEN_DIR",
                    help="rewrite --prompt with a Qwen2.5-VL folder (DreamOmni2's VLM) before sampling")
    ap.add_argument("--enhance-max-tokens", type=int, default=4096, help="enhancer max new tokens")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if (args.height is None) != (args.width is None):
        ap.error("pass both --height and --width, or neither")
    if args.steps < 1 or args.num_images < 1:
        ap.error("--steps and --num-images must be >= 1")
    if args.task == "editing" and not args.ref:
        ap.error("--task editing needs the source image as the first --ref")
    if not all(math.isfinite(v) for v in (args.guidance, args.lora_scale, args.true_cfg)):
        ap.error("--guidance, --lora-scale and --true-cfg must be finite numbers")
    return args


def enhance_prompt(qwen_dir: str, refs: list[str], prompt: str, task: str, max_new_tokens: int) -> str:
    """DreamOmni2's VLM rewrite of ``prompt`` (the enhancer is freed before Flux loads)."""
    try:
        from dreamomni2_jax.cache.enhance import QwenEnhancer
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--enhance needs torch and transformers (pip install '.[vlm]'): {e}") from None
    enhancer = QwenEnhancer(qwen_dir, max_new_tokens=max_new_tokens)
    out = enhancer(list(refs), prompt, task).strip()
    del enhancer
    if not out:
        raise ValueError(f"--enhance {qwen_dir}: the VLM returned an empty prompt")
    return out


def main(argv=None) -> int:
    from dreamomni2_jax import cli

    return cli.run(_main, argv)  # errors not handled below (damaged model files, ...): one line, exit 2


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np

    from dreamomni2_jax.sample import pipeline as sampler
    from dreamomni2_jax.utils.dtypes import SHORT
    from dreamomni2_jax.checkpoint.store import CheckpointError

    for i, ref in enumerate(args.ref):  # fail before loading the model
        if not Path(ref).is_file():
            print(f"error: --ref #{i}: image file not found: {ref}", file=sys.stderr)
            return 2
    task = args.task or ("editing" if args.ref else "generation")
    prompt = args.prompt
    if Path(args.out).is_dir():
        print(f"error: --out {args.out} is a folder; give the .png file to write", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        if args.enhance:
            prompt = enhance_prompt(args.enhance, args.ref, args.prompt, task, args.enhance_max_tokens)
        pipe = sampler.load_pipeline(args.model, SHORT[args.dtype],
                                     lora=args.lora, lora_scale=args.lora_scale)
        t1 = time.time()
        images = pipe(prompt, args.ref, height=args.height, width=args.width, steps=args.steps,
                      guidance=args.guidance, seeds=list(range(args.seed, args.seed + args.num_images)),
                      scheme=args.scheme, true_cfg_scale=args.true_cfg, negative_prompt=args.negative_prompt,
                      auto_resize=not args.no_auto_resize, max_area=args.max_area or None, reference_area=args.ref_area,
                      progress=not args.no_progress, task=task, ids_dtype=args.ids_dtype)
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # bad image / LoRA / size: named in the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not np.isfinite(images).all():
        print("error: sampling produced NaN / inf pixels (non-finite model or LoRA weights?); nothing written",
              file=sys.stderr)
        return 3
    out = Path(args.out)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix or '.png'}")
                                            for k in range(len(images))]
    for p, img in zip(paths, images):
        sampler.save_png(p, img)
    print(json.dumps({"out": [str(p) for p in paths], "size": list(images.shape[1:3]), "task": task,
                      "prompt": prompt,
                      "load_s": round(t1 - t0, 2), "sample_s": round(time.time() - t1, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
