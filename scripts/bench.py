"""Benchmark the LoRA train step: compile time, step time, tokens/s, FLOPs, MFU (or FLOP/s on CPU), peak memory.

    python scripts/bench.py --config configs/tpu_v5.py [--set k=v ...] [--model-size full] [--steps 10] \
        [--reference torch] [--out results.json]
    python scripts/bench.py --mode sample [scripts/bench_sample.py options]   # denoise step vs diffusers
    python scripts/bench.py --mode cache [scripts/bench_data.py options]     # cache + loader throughput

The model is built at the chosen size with random weights directly sharded on the mesh (``nnx.eval_shape`` +
jitted init with out_shardings; nothing unsharded on a host), LoRA from the config, one synthetic batch of
``data.batch_size`` samples: target ``data.synthetic_resolution``, references ``data.synthetic_refs`` (pixels,
(w, h)), ``data.max_sequence_length`` T5 tokens. ``--model-size``: ``full`` (the config's model: ``model.path``'s
transformer config if present, else FLUX.1 Kontext dev), ``mid`` (~36M params, 2 double + 4 single blocks,
8 heads x 64, joint 1024, default sequence 1024 target + 1024 reference + 128 text tokens) or ``tiny`` (the
test model); FLUX.2 [klein] shapes: ``klein-mid`` (2 double + 4 single blocks, 8 heads x 64, 4 rope axes, joint
1536 = 3 x 512 Qwen3 features, 128 latent channels, no guidance; the ``mid`` sequence), ``klein-4b`` / ``klein-9b``
(the published transformer configs). FLUX.2 has no FLOP model yet: its FLOPs / MFU are reported as null. ``--reference torch``: the same model size / sequence as a diffusers ``FluxTransformer2DModel``
+ peft LoRA step (eager, fp32, CPU, AdamW), timed the same way -> ratio ours / torch.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dreamomni2_jax.utils.atomic_write import write_json
from dreamomni2_jax.config import ConfigError, load_config

MID = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=1024,
           pooled_projection_dim=768, in_channels=64, axes_dims_rope=(8, 28, 28), guidance_embeds=True)
KLEIN_MID = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8,
                 joint_attention_dim=1536, in_channels=128, axes_dims_rope=(16, 16, 16, 16), guidance_embeds=False)
MID_DATA = dict(synthetic_resolution=(512, 512), synthetic_refs=((512, 512),), max_sequence_length=128)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--model-size", choices=("tiny", "mid", "full", "klein-mid", "klein-4b", "klein-9b"),
                    default="full")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--reference", choices=("torch",), default=None)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    return ap.parse_args(argv)


def flux_config(size: str, cfg):
    from dreamomni2_jax import families
    from dreamomni2_jax.models.flux import FluxConfig
    from dreamomni2_jax.models.flux2 import FLUX2_PRESETS, Flux2Config
    from dreamomni2_jax.testing.tiny_flux1 import FLUX_TINY

    if size == "tiny":
        return FluxConfig.from_dict(FLUX_TINY)
    if size == "mid":
        return FluxConfig(**MID)
    if size == "klein-mid":
        return Flux2Config(**KLEIN_MID)
    if size.startswith("klein-"):
        return FLUX2_PRESETS[size]
    if cfg.model.path:
        from dreamomni2_jax.train.loop import transformer_path

        p = transformer_path(cfg.model.path) / "config.json"
        if p.is_file():
            return families.for_path(cfg.model.path).config_class().from_json(p)
    return FluxConfig()


def layouts(cfg, downscale: int = 8):
    from dreamomni2_jax.data.stream import synthetic_layout

    return [synthetic_layout(cfg, downscale)] * cfg.data.batch_size


def make_batch(cfg, fc):
    from dreamomni2_jax.data.stream import synthetic_batch
    from dreamomni2_jax.families import for_config

    fam = for_config(fc)
    return synthetic_batch(np.random.default_rng(0), layouts(cfg), channels=fc.in_channels,
                           text_len=cfg.data.max_sequence_length, text_dim=fc.joint_attention_dim,
                           pooled_dim=getattr(fc, "pooled_projection_dim", 0) or 0, scheme=fam.scheme(cfg.model.position_scheme))


def _peak_memory():
    import jax

    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
    if peaks:
        return {"peak_device_bytes": max(peaks)}
    return {"peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _time_steps(run, steps: int) -> list[float]:
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        run(i)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times


def bench_jax(cfg, fc, batch, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dreamomni2_jax.train import flops as perf
    from dreamomni2_jax import sharding as shd
    from dreamomni2_jax.train import step as ts
    from dreamomni2_jax.lora.attach import attach_lora
    from dreamomni2_jax.families import for_config
    from dreamomni2_jax.train.optimizers import make_optimizer

    mesh = shd.make_mesh(cfg.mesh)
    shd.check_batch_size(cfg.data.batch_size, mesh, cfg.optim.grad_accum)

    def build():
        m = for_config(fc).model_class()(fc, rngs=nnx.Rngs(0), dtype=jnp.dtype(cfg.model.compute_dtype),
                                   param_dtype=jnp.dtype(cfg.model.param_dtype), attention_impl=cfg.model.attention,
                                   remat=cfg.model.remat)
        attach_lora(m, config=cfg.lora, seed=0, fresh=True)
        return m

    t0 = time.perf_counter()
    model = shd.init_sharded(build, mesh)
    init_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    dims = perf.lora_dims(model)
    empty = None
    if cfg.data.caption_dropout > 0:
        empty = {"text": jnp.zeros(batch["text"].shape[1:]), "pooled": jnp.zeros(batch["pooled"].shape[1:])}
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, state = ts.init_train_state(model, tx, mesh=mesh,
                                          empty_text=empty, ema=cfg.train.ema_decay > 0)
    if cfg.train.loss_mask != "none":  # a random half of the real target tokens in the mask
        tm = batch["img_mask"][:, :batch["target"].shape[1]]
        batch = {**batch, "loss_weight": (np.random.default_rng(0).uniform(size=tm.shape) < 0.5) * tm
                 .astype(np.float32)}
    del model
    statics = ts.make_statics(graphdef, cfg, tx=tx, guidance_embeds=fc.guidance_embeds, mesh=mesh)
    gbatch = shd.put_batch(batch, mesh)
    t0 = time.perf_counter()
    step = ts.compile_train_step(statics, state, gbatch).lower(state, gbatch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    losses = []

    def run(i):
        holder["state"], m = step(holder["state"], gbatch, jax.random.key(i))
        losses.append(float(m["loss"]))  # blocks until the step is done

    times = _time_steps(run, steps)
    n, t, r = batch["target"].shape[0], batch["target"].shape[1], batch["references"].shape[1]
    flops = perf.flux_train_flops(fc, (n, t, r), batch["text"].shape[1], dims)
    med = statistics.median(times)
    out = {"impl": "jax", "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
           "mesh": dict(mesh.shape), "params": int(n_params), "lora_params": int(sum(
               x.size for x in jax.tree.leaves(state.lora) if hasattr(x, "size"))),
           "init_s": init_s, "compile_s": compile_s, "step_s_median": med, "step_s_all": times,
           "tokens_per_s": n * (t + r + batch["text"].shape[1]) / med, "flops_per_step": flops,
           "flops_per_s": None if flops is None else flops / med,
           "mfu": None if flops is None else perf.mfu(flops, med, jax.device_count()),
           "loss_first_last": [losses[0], losses[-1]], **_peak_memory()}
    return out


def bench_torch(cfg, fc, batch, steps: int) -> dict:
    import re

    import torch
    from diffusers import FluxTransformer2DModel as TorchFlux
    from peft import LoraConfig as PeftConfig, inject_adapter_in_model

    from dreamomni2_jax.models.schemas import lora_target_patterns

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = TorchFlux(**{k: v for k, v in fc.to_dict().items() if not k.startswith("_")}).float()
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            ours = re.sub(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.", r"\1.", name)
            if any(re.search(p, ours) for p in lora_target_patterns(cfg.lora, fc)):
                names.append(name)
    model = inject_adapter_in_model(PeftConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=names,
                                               lora_dropout=cfg.lora.dropout), model)
    for n_, p in model.named_parameters():
        p.requires_grad_("lora_" in n_)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    tb = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    n, t = tb["target"].shape[:2]
    ids = tb["img_ids"][0]
    txt_ids = torch.zeros(tb["text"].shape[1], 3)
    g = torch.full((n,), cfg.model.guidance) if fc.guidance_embeds else None
    losses = []

    def run(i):
        gen = torch.Generator().manual_seed(i)
        sigma = torch.sigmoid(torch.randn(n, generator=gen))
        noise = torch.randn(tb["target"].shape, generator=gen)
        s = sigma[:, None, None]
        hidden = torch.cat([(1 - s) * tb["target"] + s * noise, tb["references"]], dim=1)
        pred = model(hidden_states=hidden, encoder_hidden_states=tb["text"], pooled_projections=tb["pooled"],
                     timestep=sigma, img_ids=ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0][:, :t]
        loss = ((pred - (noise - tb["target"])) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        losses.append(float(loss))

    times = _time_steps(run, steps)
    med = statistics.median(times)
    return {"impl": "torch", "device": "cpu", "threads": torch.get_num_threads(), "step_s_median": med,
            "step_s_all": times, "tokens_per_s": n * (tb["img_ids"].shape[1] + tb["text"].shape[1]) / med,
            "lora_params": int(sum(p.numel() for p in params)), "loss_first_last": [losses[0], losses[-1]]}


def _other_mode(argv) -> int | None:
    """``--mode sample|cache`` hands the remaining arguments to scripts/bench_sample.py / bench_data.py."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--mode" not in argv:
        return None
    i = argv.index("--mode")
    mode, rest = (argv[i + 1] if i + 1 < len(argv) else ""), argv[:i] + argv[i + 2:]
    if mode == "train":
        return main(rest)
    scripts = {"sample": "bench_sample.py", "cache": "bench_data.py"}
    if mode not in scripts:
        print(f"--mode must be one of train, sample, cache; got {mode!r}", file=sys.stderr)
        return 2
    import runpy

    module = runpy.run_path(str(Path(__file__).with_name(scripts[mode])))
    return module["main"](rest)


def main(argv=None) -> int:
    other = _other_mode(argv)
    if other is not None:
        return other
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.model_size in ("mid", "klein-mid"):  # default ~2.2k-token sequence unless --set explicitly
            explicit = {s.split("=", 1)[0].strip() for s in args.set}
            cfg = replace(cfg, data=replace(cfg.data, **{k: v for k, v in MID_DATA.items()
                                                         if f"data.{k}" not in explicit}))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        fc = flux_config(args.model_size, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e} (use --set model.path= for FLUX.1 Kontext dev sizes, or --model-size tiny|mid)",
              file=sys.stderr)
        return 2
    batch = make_batch(cfg, fc)
    n = batch["target"].shape[0]
    print(f"model {args.model_size}: inner {fc.inner_dim}, {fc.num_layers}+{fc.num_single_layers} blocks; batch {n} "
          f"x ({batch['target'].shape[1]} target + {batch['references'].shape[1]} ref + {batch['text'].shape[1]} text) "
          f"tokens; compute {cfg.model.compute_dtype}, params {cfg.model.param_dtype}, remat {cfg.model.remat}, "
          f"attention {cfg.model.attention}", flush=True)
    results = {"config": args.config, "overrides": args.set, "model_size": args.model_size,
               "flux_config": fc.to_dict(), "jax": bench_jax(cfg, fc, batch, args.steps)}
    j = results["jax"]
    print(f"jax: compile {j['compile_s']:.1f}s, step {j['step_s_median'] * 1e3:.1f} ms, "
          f"{j['tokens_per_s']:.0f} tokens/s"
          + (f", {j['flops_per_s'] / 1e12:.3f} TFLOP/s" if j["flops_per_s"] is not None else "")
          + (f", MFU {j['mfu']:.1%}" if j["mfu"] is not None else ""), flush=True)
    if args.reference == "torch":
        if not hasattr(fc, "pooled_projection_dim"):
            print("error: --reference torch compares FLUX.1 only", file=sys.stderr)
            return 2
        results["torch"] = bench_torch(cfg, fc, batch, args.steps)
        results["ratio_jax_over_torch"] = j["step_s_median"] / results["torch"]["step_s_median"]
        print(f"torch: step {results['torch']['step_s_median'] * 1e3:.1f} ms -> ours/torch = "
              f"{results['ratio_jax_over_torch']:.2f}", flush=True)
    if args.out:
        write_json(Path(args.out), results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
