"""Peak host RSS of a transformer converter on a ~1B-parameter random diffusers-layout checkpoint (numpy only).

    python scripts/bench_convert_rss.py [--model flux|flux2] [--work DIR] [--width W] [--double N] [--single M]
                                        [--keep]

``--model flux`` (default): a ``FluxTransformer2DModel`` (FLUX.1 Kontext), width 2048, 4 double + 8 single blocks.
``--model flux2``: a ``Flux2Transformer2DModel`` shaped like FLUX.2 [klein] 4B (width 3072, joint_attention_dim 7680,
no guidance embedder) with reduced layer counts, 2 double + 4 single blocks.
1. Writes a random bf16 ``transformer/`` folder (sharded safetensors + index + config.json), streaming one tensor
   at a time. 2. Runs ``convert/flux_transformer.py`` / ``convert/flux2_transformer.py`` in a subprocess and reads
   its peak RSS with ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``. 3. Measures the fixed overhead (interpreter,
   jax, orbax, tensorstore) as the peak RSS of converting a 16x narrower model (one 128-wide head for FLUX.2) with
   the same layer counts. 4. Restores the output with ``load_flux`` / ``load_flux2`` (bf16, CPU) and reports time
   and peak RSS. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESTORE = """
import resource, sys, time
import jax.numpy as jnp
from dreamomni2_jax.convert import loaders
t0 = time.perf_counter()
model = getattr(loaders, sys.argv[2])(sys.argv[1], dtype=jnp.bfloat16)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
BASELINE = """
import importlib, resource, sys
main = importlib.import_module("dreamomni2_jax.convert." + sys.argv[3]).main
main(["--src", sys.argv[1], "--out", sys.argv[2], "--no-progress"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def diffusers_shapes(d: int, n_double: int, n_single: int, in_ch=64, joint=4096, pooled=768) -> dict:
    """Key -> shape of a diffusers FluxTransformer2DModel (guidance_embeds=True, head_dim 128)."""
    lin = {"x_embedder": (d, in_ch), "context_embedder": (d, joint), "norm_out.linear": (2 * d, d),
           "proj_out": (in_ch, d), "time_text_embed.timestep_embedder.linear_1": (d, 256),
           "time_text_embed.timestep_embedder.linear_2": (d, d), "time_text_embed.guidance_embedder.linear_1": (d, 256),
           "time_text_embed.guidance_embedder.linear_2": (d, d), "time_text_embed.text_embedder.linear_1": (d, pooled),
           "time_text_embed.text_embedder.linear_2": (d, d)}
    norms = {}
    for i in range(n_double):
        p = f"transformer_blocks.{i}."
        lin.update({p + "norm1.linear": (6 * d, d), p + "norm1_context.linear": (6 * d, d),
                    p + "ff.net.0.proj": (4 * d, d), p + "ff.net.2": (d, 4 * d),
                    p + "ff_context.net.0.proj": (4 * d, d), p + "ff_context.net.2": (d, 4 * d)})
        lin.update({p + f"attn.{m}": (d, d) for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                      "add_v_proj", "to_add_out")})
        norms.update({p + f"attn.{m}": (128,) for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")})
    for i in range(n_single):
        p = f"single_transformer_blocks.{i}."
        lin.update({p + "norm.linear": (3 * d, d), p + "proj_mlp": (4 * d, d), p + "proj_out": (d, 5 * d),
                    p + "attn.to_q": (d, d), p + "attn.to_k": (d, d), p + "attn.to_v": (d, d)})
        norms.update({p + f"attn.{m}": (128,) for m in ("norm_q", "norm_k")})
    shapes = {}
    for k, s in lin.items():
        shapes[f"{k}.weight"], shapes[f"{k}.bias"] = s, (s[0],)
    shapes.update({f"{k}.weight": s for k, s in norms.items()})
    return shapes


def flux2_shapes(d: int, n_double: int, n_single: int, in_ch=128, joint=7680, mlp_ratio=3.0) -> dict:
    """Key -> shape of a diffusers Flux2Transformer2DModel (no biases, no guidance embedder, head_dim 128)."""
    h = int(d * mlp_ratio)
    shapes = {"x_embedder.weight": (d, in_ch), "context_embedder.weight": (d, joint),
              "time_guidance_embed.timestep_embedder.linear_1.weight": (d, 256),
              "time_guidance_embed.timestep_embedder.linear_2.weight": (d, d),
              "double_stream_modulation_img.linear.weight": (6 * d, d),
              "double_stream_modulation_txt.linear.weight": (6 * d, d),
              "single_stream_modulation.linear.weight": (3 * d, d),
              "norm_out.linear.weight": (2 * d, d), "proj_out.weight": (in_ch, d)}
    for i in range(n_double):
        p = f"transformer_blocks.{i}."
        shapes.update({p + f"attn.{m}.weight": (d, d) for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                                "add_k_proj", "add_v_proj", "to_add_out")})
        shapes.update({p + f"attn.{m}.weight": (128,) for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")})
        shapes.update({p + f"{ff}.linear_in.weight": (2 * h, d) for ff in ("ff", "ff_context")})
        shapes.update({p + f"{ff}.linear_out.weight": (d, h) for ff in ("ff", "ff_context")})
    for j in range(n_single):
        p = f"single_transformer_blocks.{j}.attn."
        shapes.update({p + "to_qkv_mlp_proj.weight": (3 * d + 2 * h, d), p + "to_out.weight": (d, d + h),
                       p + "norm_q.weight": (128,), p + "norm_k.weight": (128,)})
    return shapes


MODELS = {  # shapes, config.json, converter module, loader, defaults (width, double, single)
    "flux": dict(shapes=diffusers_shapes, converter="flux_transformer", loader="load_flux", defaults=(2048, 4, 8),
                 config=lambda d, nd, ns: {
                     "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
                     "out_channels": None, "num_layers": nd, "num_single_layers": ns, "attention_head_dim": 128,
                     "num_attention_heads": d // 128, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                     "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}),
    "flux2": dict(shapes=flux2_shapes, converter="flux2_transformer", loader="load_flux2", defaults=(3072, 2, 4),
                  config=lambda d, nd, ns: {
                      "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128,
                      "out_channels": None, "num_layers": nd, "num_single_layers": ns, "attention_head_dim": 128,
                      "num_attention_heads": d // 128, "joint_attention_dim": 7680, "mlp_ratio": 3.0,
                      "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "guidance_embeds": False}),
}


def _stacked_mib(shapes: dict) -> float:
    """Largest per-layer stack our checkpoint holds: the same block tensor summed over all blocks."""
    groups: dict[str, int] = {}
    for k, s in shapes.items():
        parts = k.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            key = ".".join([parts[0]] + parts[2:])
            groups[key] = groups.get(key, 0) + int(np.prod(s))
    return round(max(groups.values(), default=0) * 2 / 2**20, 1)


def write_folder(out: Path, d: int, n_double: int, n_single: int, shard_bytes: int = 2 << 30,
                 model: str = "flux") -> dict:
    from dreamomni2_jax.weights.safetensors_io import write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    spec = MODELS[model]
    shapes = spec["shapes"](d, n_double, n_single)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shards, cur, size = [], {}, 0
    for k, s in shapes.items():
        nbytes = int(np.prod(s)) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = (s, bf16), size + nbytes
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map = {}
    for n, specs in enumerate(shards):
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, specs, lambda k: (rng.standard_normal(shapes[k], np.float32) * 0.02)
                          .astype(ml_dtypes.bfloat16))
        weight_map.update({k: name for k in specs})
    total = sum(int(np.prod(s)) for s in shapes.values())
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(spec["config"](d, n_double, n_single)))
    largest = max(shapes, key=lambda k: int(np.prod(shapes[k])))
    return dict(model=model, params=total, largest_tensor=largest,
                largest_tensor_mib=round(int(np.prod(shapes[largest])) * 2 / 2**20, 1),
                largest_stacked_mib=_stacked_mib(shapes))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="flux",
                    help="flux: FLUX.1 Kontext shapes; flux2: FLUX.2 [klein] 4B shapes (default flux)")
    ap.add_argument("--work", default=None, help="scratch folder (default /tmp/<model>_rss)")
    ap.add_argument("--width", type=int, default=None, help="model width (default 2048 flux, 3072 flux2)")
    ap.add_argument("--double", type=int, default=None, help="double blocks (default 4 flux, 2 flux2)")
    ap.add_argument("--single", type=int, default=None, help="single blocks (default 8 flux, 4 flux2)")
    ap.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = ap.parse_args(argv)
    spec = MODELS[args.model]
    width, n_double, n_single = (given if given is not None else default for given, default in
                                 zip((args.width, args.double, args.single), spec["defaults"]))
    work = Path(args.work or f"/tmp/{args.model}_rss")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    info = write_folder(work / "transformer", width, n_double, n_single, model=args.model)
    info["write_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    cmd = [sys.executable, str(REPO / "convert" / f"{spec['converter']}.py"), "--src", str(work / "transformer"),
           "--out", str(work / "out"), "--dtype", "bf16", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    info["convert_s"] = round(time.perf_counter() - t0, 1)
    info["convert_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    # Fixed overhead: the same conversion (same libraries, layer counts) of a 16x narrower model.
    write_folder(work / "tiny", 128, n_double, n_single, model=args.model)
    base = subprocess.run([sys.executable, "-c", BASELINE, str(work / "tiny"), str(work / "tiny_out"),
                           spec["converter"]], capture_output=True, text=True, check=True)
    info["baseline_rss_mib"] = round(int(base.stdout.strip().splitlines()[-1]) / 1024, 1)
    info["over_baseline_mib"] = round(info["convert_peak_rss_mib"] - info["baseline_rss_mib"], 1)
    info["over_baseline_in_largest_tensors"] = round(info["over_baseline_mib"] / info["largest_tensor_mib"], 2)
    # Restore (CPU backend: the restored bf16 model itself lives in host memory).
    res = subprocess.run([sys.executable, "-c", RESTORE, str(work / "out"), spec["loader"]], capture_output=True,
                         text=True, check=True).stdout.split()
    info["restore_s"], info["restore_peak_rss_mib"] = round(float(res[-2]), 1), round(int(res[-1]) / 1024, 1)
    info["model_bf16_mib"] = round(info["params"] * 2 / 2**20, 1)
    info["checkpoint_gib"] = round(sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file()) / 2**30, 2)
    print(json.dumps(info), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
