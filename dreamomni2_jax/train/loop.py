"""The training loop as plain functions: set-up (mesh, model + LoRA, data, compiled step) and the step loop.

Everything the loop carries is in :class:`LoopContext` as plain values: ``state`` (a ``TrainState`` pytree),
``step`` (int, batches done), ``rng`` (the base key; step ``n`` uses ``fold_in(rng, n)``) and ``stream`` (an
iterator with ``get_state()`` / ``set_state()``). Checkpointing and validation sampling plug in as
:class:`Callback` objects (``on_start`` may restore ``ctx.state`` / ``ctx.step`` / the stream; ``on_step_end``
may save or sample and can request a stop; ``on_end`` flushes).

Process 0 logs: a tqdm bar, a log line every ``train.log_every`` steps and one JSON record per step in
``run_dir/metrics.jsonl`` (loss, lr, grad norm, step time, tokens/s, FLOPs, MFU or achieved FLOP/s).
Metrics of step ``n`` are fetched after step ``n + 1`` is dispatched, so the host never stalls the device.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from dreamomni2_jax import families
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.config import Config
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.train.optimizers import make_optimizer
from dreamomni2_jax.train.flops import flux_train_flops, lora_dims, mfu
from dreamomni2_jax.data import stream as data
from dreamomni2_jax.lora.layers import lora_metadata
from dreamomni2_jax.train.optimizers import eval_params

log = logging.getLogger("dreamomni2_jax.train")


class NonFiniteError(RuntimeError):
    """Training produced non-finite loss / gradients ``optim.max_nonfinite`` times in a row."""


class Callback:
    """Loop hooks (all optional). ``on_step_end`` returning True stops training after that step."""

    def on_start(self, ctx: "LoopContext") -> None:
        pass

    def on_step_end(self, ctx: "LoopContext", metrics: dict) -> bool | None:
        pass

    def on_end(self, ctx: "LoopContext") -> None:
        pass


@dataclass
class LoopContext:
    cfg: Config
    mesh: jax.sharding.Mesh
    statics: ts.StepStatics
    state: ts.TrainState
    stream: Any
    rng: jax.Array
    step: int = 0
    step_fn: Callable | None = None  # jitted train step (built from ``statics`` on the first batch)
    flux_config: Any = None  # the transformer's config and ...
    lora_dims: Any = None  # ... its adapters' sizes (perf.lora_dims): the FLOP count of each step

    def model(self, ema: bool = False):
        """The current adapted model (eval mode; shares arrays with ``state``) for sampling / export: the adapters
        to evaluate (:func:`optimizers.eval_params`), or their EMA with ``ema``."""
        from flax import nnx

        if ema and self.state.ema is None:
            raise ValueError("the EMA adapters were asked for but train.ema_decay is 0")
        lora = self.state.ema if ema else eval_params(self.cfg.optim, self.state.opt_state, self.state.lora)
        m = nnx.merge(self.statics.graphdef, lora, self.state.frozen)
        m.eval()
        return m


# --------------------------------------------------------------------------- set-up


def _dtype(name: str):
    return jnp.dtype(name)


def transformer_path(model_path: str | Path) -> Path:
    """The transformer checkpoint inside ``model.path``: a converted/diffusers pipeline folder's ``transformer/``,
    or the path itself when it already is a transformer checkpoint."""
    p = Path(model_path)
    if not str(model_path):
        raise FileNotFoundError("model.path is empty: set it to a converted model folder (convert/pipeline.py)")
    if (p / "transformer").is_dir():
        return p / "transformer"
    if p.exists():
        return p
    raise FileNotFoundError(f"model.path {p} does not exist")


def load_model(cfg: Config, mesh, seed: int | None = None):
    """``load_flux`` (base weights created sharded by :func:`sharding.param_sharding`) + LoRA from the config
    (fresh adapters, or ``lora.init_from``'s file; :func:`dreamomni2_jax.lora.attach.attach_lora`). The transformer
    class comes from the family recorded in the converted folder (FLUX.1 / FLUX.2 [klein])."""
    family = families.for_path(cfg.model.path)
    model = family.load_transformer(transformer_path(cfg.model.path), dtype=_dtype(cfg.model.compute_dtype),
                                    param_dtype=_dtype(cfg.model.param_dtype), param_sharding=shd.param_sharding(mesh),
                                    attention_impl=cfg.model.attention, remat=cfg.model.remat)
    meta = attach_lora(model, config=cfg.lora, seed=cfg.train.seed if seed is None else seed)  # init_from aware
    paths = tuple(meta["targets"])
    return model, paths


def empty_text(cfg: Config, stream) -> dict | None:
    if cfg.data.caption_dropout <= 0:
        return None
    t5, pooled = getattr(stream, "empty_prompt", (None, None))
    if t5 is None:
        raise ValueError("data.caption_dropout > 0 but the data stream has no empty-prompt embeddings "
                         "(re-run scripts/cache.py)")
    return {"text": jnp.asarray(t5), "pooled": jnp.asarray(pooled)}


def make_state(cfg: Config, model, mesh, empty_text: dict | None = None) -> tuple[ts.StepStatics, ts.TrainState]:
    """Optimizer, sharded train state and step statics of an adapted model (abstract model -> abstract state:
    what ``scripts/aot.py`` compiles)."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)  # built once: the state's and the step's
    graphdef, state = ts.init_train_state(model, tx, mesh=mesh, empty_text=empty_text, ema=cfg.train.ema_decay > 0)
    return ts.make_statics(graphdef, cfg, guidance_embeds=model.config.guidance_embeds, tx=tx, mesh=mesh), state


def setup(cfg: Config, *, model=None, stream=None, mesh=None) -> LoopContext:
    """Mesh, model (+ LoRA), data stream, train state and statics; ``model`` / ``stream`` / ``mesh`` may be given
    (tests, benchmarks). The step is compiled lazily by :func:`train` on the first batch."""
    cfg = families.resolve_config(cfg)
    mesh = mesh or shd.make_mesh(cfg.mesh)
    shd.check_batch_size(cfg.data.batch_size, mesh, cfg.optim.grad_accum)
    if model is None:
        model, paths = load_model(cfg, mesh)
        if jax.process_index() == 0:
            meta = lora_metadata(model)  # the adapters' own (lora.init_from: the file's rank / alpha)
            log.info("LoRA rank %d alpha %g on %d modules", meta["rank"], meta["alpha"], len(paths))
    if stream is None:  # this process's share; synthetic batches get the loaded model's sizes

        stream = data.make_train_stream(cfg, jax.process_index(), jax.process_count(),
                                        dims=data.ModelDims.from_flux_config(model.config))
    dims = lora_dims(model)
    statics, state = make_state(cfg, model, mesh, empty_text(cfg, stream))
    return LoopContext(cfg=cfg, mesh=mesh, statics=statics, state=state, stream=stream,
                       rng=jax.random.key(cfg.train.seed), flux_config=model.config, lora_dims=dims)


# --------------------------------------------------------------------------- loop


def check_finite(metrics: dict, step: int, max_nonfinite: int) -> None:
    """Raise :class:`NonFiniteError` once ``max_nonfinite`` consecutive steps were skipped."""
    n = int(metrics["nonfinite"])
    if n >= max_nonfinite:
        raise NonFiniteError(
            f"step {step}: {n} consecutive steps with non-finite loss or gradients (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}); updates were skipped, training stops "
            f"(optim.max_nonfinite={max_nonfinite}). Lower optim.lr, check the data, or use float32 compute.")


class MetricsWriter:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` (process 0 only)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def step_info(ctx: LoopContext, batch: dict) -> dict:
    """Tokens (image + text, padded) and analytic FLOPs of one step on ``batch`` (global shapes)."""
    b = batch["target"].shape[0]
    t, r, txt = batch["target"].shape[1], batch["references"].shape[1], batch["text"].shape[1]
    return {"tokens": b * (t + r + txt),
            "flops": flux_train_flops(ctx.flux_config, (b, t, r), txt, ctx.lora_dims)}


def _record(info: dict, step: int, raw: dict, dt: float | None, n_devices: int) -> dict:
    rec = {"step": step, **{k: float(v) for k, v in raw.items() if k not in ("finite", "nonfinite")},
           "finite": bool(raw["finite"]), "nonfinite": int(raw["nonfinite"])}
    if info["flops"] is not None:  # None: no FLOP model for this family
        rec["flops_per_step"] = info["flops"]
    if dt:
        rec["step_time_s"] = dt
        rec["tokens_per_s"] = info["tokens"] / dt
        if info["flops"] is not None:
            rec["flops_per_s"] = info["flops"] / dt
            util = mfu(info["flops"], dt, n_devices)
            if util is not None:
                rec["mfu"] = util
    return rec


def train(ctx: LoopContext, callbacks: Sequence[Callback] = (), *, progress: bool = True,
          on_metrics: Callable[[dict], None] | None = None) -> LoopContext:
    """Run from ``ctx.step`` to ``cfg.train.steps``; returns the context with the final state.

    After each dispatched step, ``cb.on_step_end(ctx, metrics)`` runs with ``ctx.step`` = steps done and
    ``ctx.state`` = the state after it (device arrays, possibly still computing; ``metrics`` likewise). Logging
    fetches step ``n``'s metrics after step ``n + 1`` is dispatched; ``on_metrics(record)`` sees each record."""
    cfg, main = ctx.cfg, jax.process_index() == 0
    for cb in callbacks:
        cb.on_start(ctx)
    writer = MetricsWriter(cfg.train.run_dir) if main else None
    bar = None
    if main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=ctx.step, desc="train", dynamic_ncols=True)
    compiled: dict = {}
    pending, last_t = None, None

    def finish(step, raw, info):  # fetch, log and check one dispatched step's metrics
        nonlocal last_t
        raw = jax.device_get(raw)
        now = time.perf_counter()
        dt = None if last_t is None else now - last_t
        last_t = now
        rec = _record(info, step, raw, dt, ctx.mesh.size)
        if main:
            writer.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            if step % cfg.train.log_every == 0:
                log.info("step %d loss %.5f lr %.3e grad_norm %.3f%s", step, rec["loss"], rec["lr"],
                         rec["grad_norm"], f" {dt:.3f}s/step" if dt else "")
        if on_metrics is not None:
            on_metrics(rec)
        check_finite(raw, step, cfg.optim.max_nonfinite)

    try:
        stop = False
        while ctx.step < cfg.train.steps and not stop:
            local = next(ctx.stream)
            batch = shd.put_batch({k: local[k] for k in ts.batch_keys(local)}, ctx.mesh)
            shapes = tuple((k, v.shape, str(v.dtype)) for k, v in batch.items())
            if shapes not in compiled:
                t0 = time.perf_counter()
                if ctx.step_fn is None:
                    ctx.step_fn = ts.compile_train_step(ctx.statics, ctx.state, batch)
                compiled[shapes] = ctx.step_fn.lower(ctx.state, batch, ctx.rng).compile()
                if main:
                    log.info("compiled train step for %s in %.1fs", {k: v for k, v, _ in shapes},
                             time.perf_counter() - t0)
                last_t = None
            info = step_info(ctx, batch)
            ctx.state, metrics = compiled[shapes](ctx.state, batch, jax.random.fold_in(ctx.rng, ctx.step))
            ctx.step += 1
            if pending is not None:
                finish(*pending)
            pending = (ctx.step, metrics, info)
            t_cb = time.perf_counter()
            stop = any([bool(cb.on_step_end(ctx, metrics)) for cb in callbacks])
            if last_t is not None:  # callback time (saving, sampling) is not step time
                last_t += time.perf_counter() - t_cb
        if pending is not None:
            finish(*pending)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    for cb in callbacks:
        cb.on_end(ctx)
    return ctx
