"""Ahead-of-time compilation for a TPU pod slice or an NVIDIA host, from a CPU-only machine: will a config fit?

The train step compiled here is the one ``scripts/train.py`` runs: the abstract model (``nnx.eval_shape``, no
weights read) with LoRA, the sharded state from :func:`loop.make_state` and :func:`train_step.compile_train_step`,
lowered with the batch shapes the data pipeline produces. ``mode="sample"`` compiles the sampler's denoising scan.
Targets are device descriptions, not devices: ``libtpu`` (extra ``aot``) describes TPU slices, the CUDA plugin
(extra ``cuda12``) NVIDIA GPUs from a target description. Per-chip bytes come from XLA's memory analysis of the
compiled program; a TPU program that does not fit fails to compile, which is reported as ``fits: false`` with
the compiler's numbers.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np

GIB = 2**30


class AOTError(ValueError):
    """Bad target name, or the target's compiler is not installed."""


@dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it: v5p-8, h100x8
    platform: str  # "tpu" | "cuda"
    topology: str  # libtpu topology name ("v5p:2x2x1") or the GPU "hosts x processes x devices" string
    chips: int
    hbm_bytes: int  # per chip, as the compiler sees it (TPU) / the device reports it (GPU)
    usable_fraction: float = 1.0  # of hbm_bytes a program may use (GPU: CUDA context, cuDNN / NCCL buffers)
    slices: int = 1  # TPU multi-slice: this many copies of ``topology`` over the data-center network
    hosts: int = 1  # NVIDIA: hosts of 8 GPUs (TPU: the slice's hosts are read from its devices)


# TPU: (libtpu name, TensorCores per chip counted in the slice name, HBM per chip as libtpu's compiler reports it)
_TPU = {"v5p": ("v5p", 2, int(95.74 * GIB)), "v5e": ("v5e", 1, int(15.75 * GIB)),
        "v6e": ("v6e", 1, int(31.25 * GIB))}
_TPU_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
           512: "8x8x8"}
_TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# NVIDIA: memory as the CUDA driver reports it (cudaMemGetInfo total). H200 = H100 with 141 GB of HBM3e.
_GPU = {"h100": ("NVIDIA H100 80GB HBM3", 84_942_979_072), "h200": ("NVIDIA H200", 150_754_820_096)}
GPU_USABLE = 0.92


def parse_target(name: str) -> Target:
    """``v5p-8`` / ``v5e-16`` / ``v6e-64`` (slice names: v5p counts TensorCores, 2 per chip; several hosts from
    v5p-16 / v6e-16 on), ``2xv5p-8`` (2 slices over the data-center network: multi-slice), ``h100x8`` (one host)
    or ``h100x16`` / ``2xh100x8`` (2 hosts of 8 GPUs)."""
    n = name.strip().lower()
    m = re.fullmatch(r"(?:(\d+)x)?(v5p|v5e|v6e)-(\d+)", n)
    if m:
        gen, per_chip, hbm = _TPU[m.group(2)]
        slices, cores = int(m.group(1) or 1), int(m.group(3))
        chips = cores // per_chip
        shapes = _TPU_3D if gen == "v5p" else _TPU_2D
        if cores % per_chip or chips not in shapes:
            raise AOTError(f"--topology {name}: unknown slice size; known: "
                           + ", ".join(f"{m.group(2)}-{c * per_chip}" for c in shapes))
        if slices < 1:
            raise AOTError(f"--topology {name}: the number of slices must be >= 1")
        return Target(name, "tpu", f"{gen}:{shapes[chips]}", chips * slices, hbm, slices=slices)
    m = re.fullmatch(r"(?:(\d+)x)?(h100|h200)x(\d+)", n)
    if m:
        hosts, gpus = int(m.group(1) or 1), int(m.group(3))
        if m.group(1) is None and gpus > 8 and gpus % 8 == 0:  # h100x16: hosts of 8
            hosts, gpus = gpus // 8, 8
        if hosts >= 1 and (gpus in (1, 2, 4) and hosts == 1 or gpus == 8):
            # "<slices>x<hosts per slice>x<devices per host>": a slice is an NVLink domain, here one host
            return Target(name, "cuda", f"{hosts}x1x{gpus}", hosts * gpus, _GPU[m.group(2)][1], GPU_USABLE,
                          hosts=hosts)
    raise AOTError(f"--topology {name!r}: expected a TPU slice (v5p-8, v5p-64, v5e-16, v6e-8, v6e-64, ...), "
                   "several slices (2xv5p-8), an NVIDIA host (h100x1, h100x8, h200x1, h200x8) or hosts of 8 GPUs "
                   "(h100x16, 2xh100x8)")


def gpu_target_config(name: str) -> str:
    """``GpuTargetConfig`` text proto of a Hopper GPU (SM 9.0, 132 SMs) with ``name``'s memory."""
    kind, memory = _GPU[name[:4].lower()]
    info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * 1024,
                shared_memory_per_core=228 * 1024, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
                block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
                memory_bandwidth=3_352_320_000_000 if kind.startswith("NVIDIA H100") else 4_800_000_000_000,
                l2_cache_size=50 * 2**20, clock_rate_ghz=1.98, device_memory_size=memory,
                shared_memory_per_block_optin=227 * 1024, registers_per_core_limit=65536,
                registers_per_block_limit=65536)
    body = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (f"gpu_device_info {{\n{body}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 8 }}\ndevice_description_str: "{kind}"\n')


def target_devices(target: Target) -> list:
    """The target's devices (descriptions to compile for; nothing runs on them)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        try:
            import libtpu  # noqa: F401
        except ImportError as e:
            raise AOTError(f"compiling for {target.name} needs libtpu: pip install -e '.[aot]' "
                           "(the `aot` extra)") from e
        # compile-only: no TPU is opened, so several compiles (and a training job on a TPU VM) may run at once
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU VM metadata server to ask
        extra = {"num_slices": target.slices} if target.slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **extra).devices)
    if os.environ.get("JAX_PLATFORMS", "") != "cpu":
        raise AOTError("compiling for NVIDIA GPUs without a GPU needs JAX_PLATFORMS=cpu set before JAX starts "
                       "(scripts/aot.py sets it for h100/h200 targets)")
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError as e:
        raise AOTError(f"compiling for {target.name} needs the CUDA plugin: pip install -e '.[cuda12]' "
                       "(the `cuda12` extra)") from e
    gpu = re.search(r"h[12]00", target.name.lower()).group()
    topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(gpu),
                                        topology=target.topology)
    return list(topo.devices)


# --------------------------------------------------------------------------- what is compiled


# ``--model`` names: published transformer configs compiled without a checkpoint (FLUX.2 [klein] "Base" shapes)
MODELS = ("kontext", "klein-4b", "klein-9b")


def flux_config(cfg, layers: tuple[int, int] | None = None, model: str | None = None):
    """The transformer config: ``model`` (one of :data:`MODELS`) when given, else ``model.path``'s config.json
    (its family's config class) when it exists, else Flux Kontext dev; with ``layers`` = (double, single) blocks
    when given (full width, fewer blocks)."""
    from pathlib import Path

    # deferred import: JAX and the model code load only after target_devices() set up the compile-only platforms
    from dreamomni2_jax import families
    from dreamomni2_jax.train.loop import transformer_path
    from dreamomni2_jax.models.flux import FluxConfig
    from dreamomni2_jax.models.flux2 import FLUX2_PRESETS

    fc = FluxConfig()
    if model is not None:
        if model not in MODELS:
            raise AOTError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
        fc = FLUX2_PRESETS[model] if model in FLUX2_PRESETS else FluxConfig()
    elif cfg.model.path:
        p = transformer_path(cfg.model.path) / "config.json"
        if Path(p).is_file():
            fc = families.for_path(cfg.model.path).config_class().from_json(p)
    if layers is not None:
        fc = dataclasses.replace(fc, num_layers=int(layers[0]), num_single_layers=int(layers[1]))
    return fc


def for_family(cfg, fc):
    """``cfg`` with the settings ``fc``'s model family fixes (FLUX.2: the ``flux2`` position ids)."""
    from dreamomni2_jax import families

    scheme = families.for_config(fc).scheme(cfg.model.position_scheme)
    return cfg if scheme == cfg.model.position_scheme else dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, position_scheme=scheme))


def abstract_model(cfg, fc, *, lora: bool = True):
    """Shape-only transformer of ``fc``'s family (+ fresh LoRA adapters from ``cfg.lora``): ``nnx.eval_shape``,
    nothing allocated."""
    import jax.numpy as jnp
    from flax import nnx

    from dreamomni2_jax import families
    from dreamomni2_jax.lora.attach import attach_lora

    cls = families.for_config(fc).model_class()

    def build():
        m = cls(fc, rngs=nnx.Rngs(0), dtype=jnp.dtype(cfg.model.compute_dtype),
                param_dtype=jnp.dtype(cfg.model.param_dtype), attention_impl=cfg.model.attention,
                remat=cfg.model.remat)
        if lora:
            attach_lora(m, config=cfg.lora, seed=cfg.train.seed, fresh=True)
        return m

    return nnx.eval_shape(build)


def batch_shapes(cfg, fc, batch: int) -> dict:
    """Shapes/dtypes of a training batch of ``batch`` samples at ``data.synthetic_resolution`` with
    ``data.synthetic_refs``: one sample assembled by the data pipeline, its batch axis widened."""
    import jax

    from dreamomni2_jax.data import stream as data
    from dreamomni2_jax.utils.dtypes import np_dtype
    from dreamomni2_jax.train.step import BATCH_KEYS

    dims = data.ModelDims.from_flux_config(fc)
    sample = data.synthetic_sample(np.random.default_rng(0), data.synthetic_layout(cfg, dims.downscale), dims,
                                   cfg.data.max_sequence_length, np_dtype(cfg.model.param_dtype))  # as the stream
    one = data.assemble_batch([sample], cfg.model.position_scheme)
    return {k: jax.ShapeDtypeStruct((batch, *one[k].shape[1:]), one[k].dtype) for k in BATCH_KEYS}


def _mesh(cfg, devices):
    from dreamomni2_jax import sharding as shd

    return shd.make_mesh(cfg.mesh, devices)


def lower_train(cfg, devices, fc):
    """``(lowered, info)`` of the train step for ``cfg`` on ``devices`` (abstract state, real shardings)."""
    import jax
    import jax.numpy as jnp

    from dreamomni2_jax import sharding as shd
    from dreamomni2_jax.train import step as ts
    from dreamomni2_jax.train.loop import make_state

    mesh = _mesh(cfg, devices)
    shd.check_batch_size(cfg.data.batch_size, mesh, cfg.optim.grad_accum)
    model = abstract_model(cfg, fc)
    empty = None
    if cfg.data.caption_dropout > 0:
        dt = jnp.dtype(cfg.model.param_dtype)
        empty = {"text": jax.ShapeDtypeStruct((cfg.data.max_sequence_length, fc.joint_attention_dim), dt),
                 "pooled": jax.ShapeDtypeStruct((getattr(fc, "pooled_projection_dim", 0) or 0,), dt)}
    statics, state = make_state(cfg, model, mesh, empty)
    shapes = batch_shapes(cfg, fc, cfg.data.batch_size)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(mesh, len(v.shape)))
             for k, v in shapes.items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))
    step = ts.compile_train_step(statics, state, batch)
    t = batch["target"].shape[1] + batch["references"].shape[1] + batch["text"].shape[1]
    info = {"mesh": dict(mesh.shape), "batch_per_chip": cfg.data.batch_size // cfg.optim.grad_accum
            // shd.batch_shards(mesh), "global_batch": cfg.data.batch_size,
            "grad_accum": cfg.optim.grad_accum, "tokens_per_sample": t,
            "references": len(cfg.data.synthetic_refs),
            "state_bytes_per_chip": _per_chip_bytes(state)}
    return step.lower(state, batch, rng), info


def lower_sample(cfg, devices, fc, batch: int = 1):
    """``(lowered, info)`` of the sampler's denoising scan (``sample.steps`` steps, one image per prompt) with the
    adapted model sharded like training and the inputs replicated, as in ``Pipeline`` on a training mesh."""
    import jax
    from flax import nnx

    from dreamomni2_jax import sharding as shd
    from dreamomni2_jax.sample.pipeline import _denoise_jit

    mesh = _mesh(cfg, devices)
    model = abstract_model(cfg, fc)
    model.eval()
    graphdef, state = nnx.split(model)
    state = shd.place(state, shd.model_state_shardings(state, mesh))
    rep = shd.replicated(mesh)
    shapes, n_tokens = sample_input_shapes(cfg, fc, batch)
    inputs = tuple(None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep) for x in shapes)
    # The progress callback needs the GPU runtime to lower; without a GPU the CUDA program is compiled without it.
    tick = None if devices[0].platform in ("gpu", "cuda") else _no_tick
    lowered = _denoise_jit.lower(graphdef, state, *inputs, tick=tick, mesh=mesh)
    info = {"mesh": dict(mesh.shape), "images": batch, "steps": cfg.sample.steps, "tokens_per_sample": n_tokens,
            "references": len(cfg.data.synthetic_refs), "state_bytes_per_chip": _per_chip_bytes(state),
            "progress_callback": tick is not None}
    return lowered, info


def sample_input_shapes(cfg, fc, batch: int = 1, steps: int | None = None):
    """Shapes of the sampler's ``_denoise`` inputs after the model argument (noise, reference tokens, T5 / pooled
    embeddings, image / text ids, guidance, timesteps, sigmas, CFG scale) for ``batch`` images of
    ``data.synthetic_resolution`` with ``data.synthetic_refs``; and the tokens per image."""
    import jax
    import jax.numpy as jnp

    from dreamomni2_jax import families
    from dreamomni2_jax.layout import ids_flux1 as positions

    fam = families.for_config(fc)
    (tw, th), refs = cfg.data.synthetic_resolution, cfg.data.synthetic_refs
    layout = positions.SampleLayout((th // 8, tw // 8), tuple((h // 8, w // 8) for w, h in refs))  # VAE 8x
    n_t = (th // 16) * (tw // 16)  # 2x2 packing
    n_r = sum((h // 16) * (w // 16) for w, h in refs)
    c, dt, txt = fc.in_channels, jnp.dtype(cfg.model.compute_dtype), cfg.data.max_sequence_length
    steps = cfg.sample.steps if steps is None else steps
    s = jax.ShapeDtypeStruct
    ids = layout.ids(fam.scheme(cfg.model.position_scheme))
    rows = 2 * batch if fam.guidance_is_cfg else batch  # [positive; empty prompt] rows with classifier-free guidance
    shapes = (s((batch, n_t, c), jnp.float32), s((batch, n_r, c), dt), s((rows, txt, fc.joint_attention_dim), dt),
              s((rows, getattr(fc, "pooled_projection_dim", 0) or 0), dt), s(ids.shape, jnp.int32),
              s(fam.text_ids(txt).shape, jnp.int32),
              s((batch,), jnp.float32) if fc.guidance_embeds else None, s((steps,), jnp.float32),
              s((steps + 1,), jnp.float32), s((), jnp.float32))
    return shapes, n_t + n_r + txt


def _no_tick(i) -> None:
    pass


def _per_chip_bytes(tree) -> int:
    """Bytes of ``tree``'s leaves held by one chip (the largest shard of each leaf, summed)."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return int(total)


# --------------------------------------------------------------------------- compile and report

_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_numbers(msg: str) -> tuple[int, int] | None:
    """(required, available) bytes from a TPU compiler out-of-memory error, else None."""
    m = _OOM.search(msg) or _USED.search(msg)
    if not m:
        return None
    return (int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)]))


def attention_in_program(text: str) -> str:
    """Which attention kernel the compiled program calls: "splash", "cudnn" or "xla" (plain XLA ops)."""
    if "__cudnn$fmha" in text:
        return "cudnn"
    if "splash" in text or ("tpu_custom_call" in text and "attention" in text):
        return "splash"
    return "xla"


def compile_report(cfg, target: Target, *, mode: str = "train", layers=None, sample_batch: int = 1,
                   model: str | None = None) -> dict:
    """Compile ``mode`` ("train" | "sample") of ``cfg`` for ``target`` (``model``: see :func:`flux_config`); the
    JSON-ready report."""
    import jax

    from dreamomni2_jax import families
    from dreamomni2_jax.models.attention import resolve_impl

    devices = target_devices(target)
    if len(devices) != target.chips:
        raise AOTError(f"{target.name}: the compiler describes {len(devices)} devices, expected {target.chips}")
    fc = flux_config(cfg, layers, model)
    cfg = for_family(cfg, fc)
    t0 = time.perf_counter()
    lowered, info = (lower_train(cfg, devices, fc) if mode == "train"
                     else lower_sample(cfg, devices, fc, sample_batch))
    t1 = time.perf_counter()
    usable = int(target.hbm_bytes * target.usable_fraction)
    report = {"target": target.name, "platform": target.platform, "topology": target.topology,
              "chips": target.chips, "slices": target.slices,
              "hosts": len({d.process_index for d in devices}), "device_kind": devices[0].device_kind, "mode": mode,
              "model": {"family": families.for_config(fc).name, "double_blocks": fc.num_layers,
                        "single_blocks": fc.num_single_layers, "inner_dim": fc.inner_dim},
              "lora": {"preset": cfg.lora.preset, "rank": cfg.lora.rank},
              "attention": {"configured": cfg.model.attention,
                            "resolved": resolve_impl(cfg.model.attention, devices)},
              "remat": cfg.model.remat, **info, "lower_s": round(t1 - t0, 1)}
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that do not fit
        nums = _oom_numbers(str(e))
        if nums is None:
            raise
        # the compiler reports only the temporaries it needed: peak >= temporaries + the state (arguments)
        peak = nums[0] + info["state_bytes_per_chip"]
        report.update({"compile_s": round(time.perf_counter() - t1, 1), "compiled": False,
                       "temp_bytes_required": nums[0], "peak_bytes_per_chip": peak, "peak_is_lower_bound": True,
                       "capacity_bytes": target.hbm_bytes, "usable_bytes": min(usable, nums[1]), "fits": False,
                       "headroom_bytes": min(usable, nums[1]) - peak,
                       "error": str(e).strip().splitlines()[0][:300]})
        return _with_gib(report)
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    per = {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
           "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
           "generated_code_bytes": mem.generated_code_size_in_bytes}
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    peak = max(peak, per["argument_bytes"] + per["output_bytes"] - per["alias_bytes"] + per["temp_bytes"])
    text = compiled.as_text()
    report["attention"]["in_program"] = attention_in_program(text)
    # every chip of the target is in the program: its inputs span them (a multi-slice program is one SPMD
    # program per slice, num_partitions = the chips of one slice, joined by the data-center network collectives)
    report["program_devices"] = max(len(s.device_set) for s in jax.tree.leaves(compiled.input_shardings))
    parts = re.search(r"num_partitions=(\d+)", text)
    report["hlo_num_partitions"] = int(parts.group(1)) if parts else None
    report.update({"compile_s": round(t2 - t1, 1), "compiled": True, "per_chip": per,
                   "peak_bytes_per_chip": peak, "capacity_bytes": target.hbm_bytes, "usable_bytes": usable,
                   "fits": peak <= usable, "headroom_bytes": usable - peak})
    return _with_gib(report)


def _with_gib(report: dict) -> dict:
    for k in ("peak_bytes_per_chip", "capacity_bytes", "usable_bytes", "headroom_bytes"):
        report[k.replace("bytes", "gib")] = round(report[k] / GIB, 2)
    return report


def _next_probe(points, usable: int, lo: int, hi: int) -> int:
    """Next batch to try in (lo, hi): where the line through the last two (batch, peak) points (one point: a line
    through the origin) reaches ``usable``, clamped into the open interval."""
    (b1, p1), (b0, p0) = points[-1], (points[-2] if len(points) > 1 else (0, 0))
    slope = (p1 - p0) / (b1 - b0) if b1 != b0 else 0
    guess = int(b1 + (usable - p1) // slope) if slope > 0 else (lo + hi) // 2
    return min(max(guess, lo + 1), hi - 1)


REMAT_ORDER = ("none", "dots_no_batch_saveable", "full")  # cheapest recompute first


def fit(cfg, target: Target, *, layers=None, max_batch_per_chip: int = 64, remats=None, log=print,
        model: str | None = None) -> dict:
    """The largest per-chip micro-batch that fits, for each remat policy (``remats``, default ``none`` ->
    ``full``); the answer is the first policy with the largest batch. Every answer is a compiled program."""
    from dreamomni2_jax import sharding as shd

    mesh = _mesh(cfg, target_devices(target))
    shards = shd.batch_shards(mesh)
    results, seen = {}, {}
    for remat in remats or REMAT_ORDER:
        def run(b, remat=remat):
            c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat),
                                    data=dataclasses.replace(cfg.data, batch_size=b * shards * cfg.optim.grad_accum))
            r = compile_report(c, target, layers=layers, model=model)
            seen.setdefault("model", {**r["model"], "lora": r["lora"]})
            log(f"  remat={remat} batch/chip={b}: peak {r['peak_gib_per_chip']} GiB of {r['usable_gib']} "
                f"-> {'fits' if r['fits'] else 'does not fit'} ({r['compile_s']} s)")
            return r

        # lo: largest batch known to fit, hi: smallest known not to. Probes follow a line through the last two
        # (batch, peak) points (a TPU program that does not fit fails fast, so the first probe is the largest).
        best, lo, hi, points = None, 0, max_batch_per_chip + 1, []
        b = max_batch_per_chip if target.platform == "tpu" else 1
        while hi - lo > 1:
            r = run(b)
            points.append((b, r["peak_bytes_per_chip"]))
            if r["fits"]:
                best, lo = r, b
            else:
                hi = b
            b = _next_probe(points, r["usable_bytes"], lo, hi)
        results[remat] = {"largest_batch_per_chip": lo, "compiles": len(points),
                          "peak_gib_per_chip": None if best is None else best["peak_gib_per_chip"],
                          "compile_s": None if best is None else best["compile_s"],
                          "attention": None if best is None else best["attention"]}
    top = max(r["largest_batch_per_chip"] for r in results.values())
    choice = next((k for k, r in results.items() if r["largest_batch_per_chip"] == top and top > 0), None)
    return {"target": target.name, "chips": target.chips, "model": seen.get("model"),
            "references": len(cfg.data.synthetic_refs),
            "resolution": list(cfg.data.synthetic_resolution), "by_remat": results,
            "best": None if choice is None else {"remat": choice, "batch_per_chip": top}}
