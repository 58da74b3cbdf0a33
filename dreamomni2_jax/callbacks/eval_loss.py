"""Held-out loss: a deterministic validation loss over a second cache (``data.eval_cache_dir``).

Every ``train.eval_every`` steps, each held-out record is scored at ``train.eval_sigmas`` fixed noise levels, the
quantiles ``(k + 0.5) / K`` of the training σ distribution (``train.timestep_sampling``; ``sigmoid_shift`` shifts
them by the record's own token count), with noise fixed per (record, σ): ``fold_in(fold_in(key(EVAL_SEED),
record), k)``. The loss is the training loss (σ weighting, ``train.loss_mask`` weights; no caption or reference
dropout) averaged over σ and records, so only the adapters change it. It never draws from the training RNG stream.
The step is one ``jax.jit`` with the train step's shardings (adapters / base weights as placed, batch over
``(data, fsdp)``). Records are batched ``data.batch_size`` at a time within one shape bucket (a last, partial
batch is completed by repeating its first record, which then counts 0). Results go to ``metrics.jsonl``
(``{"step", "eval_loss", "eval_loss_by_sigma"}``) and TensorBoard (``run_dir/tb``, tag ``eval/loss``).
"""
from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamomni2_jax import sharding as shd
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.sample.schedule import calculate_shift, time_shift
from dreamomni2_jax.data import stream as data
from dreamomni2_jax.cache.records import CacheError, decode_record, load_index
from dreamomni2_jax.train.optimizers import eval_params
from dreamomni2_jax.utils.tensorboard import summary_writer

log = logging.getLogger("dreamomni2_jax.train")
EVAL_SEED = 0x45564C  # "EVL"


def sigma_quantiles(n: int, cfg: ts.StepConfig, seq_len: jax.Array) -> jax.Array:
    """[B, n] σ: the quantiles ``(k + 0.5) / n`` of the training σ distribution (per sample for sigmoid_shift)."""
    u = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
    if cfg.timestep_sampling in ("logit_normal", "sigmoid_shift"):
        u = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.scipy.special.ndtri(u))
    elif cfg.timestep_sampling == "mode":
        u = 1.0 - u - cfg.mode_scale * (jnp.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    sig = jnp.broadcast_to(u, (seq_len.shape[0], n))
    if cfg.timestep_sampling == "sigmoid_shift":
        sig = time_shift(calculate_shift(seq_len.astype(jnp.float32))[:, None], sig)
    return sig


def eval_losses(lora, frozen, batch: dict, record: jax.Array, *, statics: ts.StepStatics, n_sigmas: int):
    """Per-sample loss for each σ quantile, [B, n_sigmas] (``record`` [B]: held-out record indices)."""
    cfg = dataclasses_replace_no_dropout(statics.cfg)
    model = nnx.merge(statics.graphdef, lora, frozen)
    model.eval()
    b, t, c = batch["target"].shape
    seq = batch["img_mask"][:, :t].astype(jnp.float32).sum(1)
    sigmas = sigma_quantiles(n_sigmas, cfg, seq)
    base = jax.random.key(EVAL_SEED)

    def one(k):
        noise = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, r), k), (t, c),
                                                     jnp.float32))(record)
        draws = {"sigma": sigmas[:, k], "noise": noise, "drop_caption": jnp.zeros((b,), bool)}
        return ts.per_sample_losses(model, batch, draws, cfg)[0]

    return jax.lax.map(one, jnp.arange(n_sigmas)).T


def dataclasses_replace_no_dropout(cfg: ts.StepConfig) -> ts.StepConfig:
    import dataclasses

    return dataclasses.replace(cfg, caption_dropout=0.0, lora_dropout=False)


class HeldOut:
    """The held-out batches of ``data.eval_cache_dir`` for this process and the jitted evaluation."""

    def __init__(self, cfg, process_index: int = 0, process_count: int = 1):
        root = Path(cfg.data.eval_cache_dir)
        index = load_index(root)
        for s in index["shards"]:
            data.check_shard(root / s["file"], s.get("num_records"))
        from array_record.python.array_record_module import ArrayRecordReader

        records = []
        for s in index["shards"]:
            r = ArrayRecordReader(str(root / s["file"]))
            try:
                records += [decode_record(bytes(x)) for x in r.read(list(range(s["num_records"])))]
            finally:
                r.close()
        if cfg.train.loss_mask == "manifest" and not any("loss_mask" in a for a, _ in records):
            raise CacheError(f"train.loss_mask='manifest' but no record of data.eval_cache_dir {root} has a mask")
        bsz, local = cfg.data.batch_size, data._local_batch(cfg, process_count)
        opts = data.SampleOptions.from_config(cfg)
        opts = type(opts)(0.0, opts.seed, opts.loss_mask, opts.mask_threshold, opts.mask_dilate)  # no ref dropout
        groups: dict = {}
        for i, (a, _) in enumerate(records):
            groups.setdefault(data._key(a), []).append(i)
        self.batches = []  # (local batch dict, record indices [local], valid [global batch])
        for key in sorted(groups):
            idx = groups[key]
            for lo in range(0, len(idx), bsz):
                part = idx[lo:lo + bsz]
                valid = [True] * len(part) + [False] * (bsz - len(part))
                part = part + [part[0]] * (bsz - len(part))
                mine = slice(process_index * local, (process_index + 1) * local)
                rows = [records[i] for i in part[mine]]
                batch = data.process_samples(rows, 0, opts, cfg.model.position_scheme, None, None)
                self.batches.append((batch, np.asarray(part[mine], np.int32), np.asarray(valid, bool)))
        self.num_records = len(records)
        self.n_sigmas = cfg.train.eval_sigmas
        self._fns: dict = {}

    def _fn(self, statics: ts.StepStatics, state: ts.TrainState, batch: dict):
        fn = functools.partial(eval_losses, statics=statics, n_sigmas=self.n_sigmas)
        if statics.mesh is None:
            return jax.jit(fn)
        mesh = statics.mesh
        bsh = {k: shd.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        return jax.jit(fn, in_shardings=(shd.shardings_of(state.lora), shd.shardings_of(state.frozen), bsh,
                                         shd.batch_sharding(mesh, 1)), out_shardings=shd.replicated(mesh))

    def evaluate(self, statics: ts.StepStatics, state: ts.TrainState, lora=None) -> dict:
        """``{"eval_loss", "eval_loss_by_sigma"}`` of ``lora`` (default: the state's adapters)."""
        lora = state.lora if lora is None else lora
        total, count = np.zeros(self.n_sigmas), 0
        for local, record, v in self.batches:
            keys = ts.batch_keys(local)
            if statics.mesh is not None:
                batch = shd.put_batch({k: local[k] for k in keys}, statics.mesh)
                record_g = shd.put_batch({"r": record}, statics.mesh)["r"]
            else:
                batch, record_g = {k: jnp.asarray(local[k]) for k in keys}, jnp.asarray(record)
            shapes = tuple((k, v.shape) for k, v in batch.items())
            if shapes not in self._fns:
                self._fns[shapes] = self._fn(statics, state, batch)
            losses = np.asarray(jax.device_get(self._fns[shapes](lora, state.frozen, batch, record_g)))  # replicated
            total += (losses * v[:, None]).sum(0)
            count += int(v.sum())
        by_sigma = total / count
        return {"eval_loss": float(by_sigma.mean()), "eval_loss_by_sigma": [float(x) for x in by_sigma]}


class EvalLossCallback:
    """Loop callback: the held-out loss every ``train.eval_every`` steps."""

    def __init__(self, cfg):
        self.cfg, self.held = cfg, None
        self._writer = None

    def on_start(self, ctx) -> None:
        self.held = HeldOut(self.cfg, jax.process_index(), jax.process_count())
        if jax.process_index() == 0:
            log.info("held-out loss: %d records, every %d steps", self.held.num_records, self.cfg.train.eval_every)

    def on_step_end(self, ctx, metrics) -> None:
        if ctx.step % self.cfg.train.eval_every:
            return

        lora = eval_params(self.cfg.optim, ctx.state.opt_state, ctx.state.lora)  # schedule-free: its x point
        rec = {"step": ctx.step, **self.held.evaluate(ctx.statics, ctx.state, lora)}
        if jax.process_index() != 0:
            return
        with open(Path(self.cfg.train.run_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self._writer is None:
            self._writer = summary_writer(Path(self.cfg.train.run_dir) / "tb")
        self._writer.add_scalar("eval/loss", rec["eval_loss"], global_step=ctx.step)
        self._writer.flush()
        log.info("step %d held-out loss %.5f", ctx.step, rec["eval_loss"])

    def on_end(self, ctx) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
