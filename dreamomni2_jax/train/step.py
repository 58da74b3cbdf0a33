"""Flow-matching LoRA train step for Flux Kontext / DreamOmni2 and FLUX.2 [klein] (pure function, jitted with
explicit shardings; the model call goes through :mod:`dreamomni2_jax.families`).

Batch (numpy or global jax arrays, batch-first; built by the data pipeline or :func:`data.synthetic_batch`):
``target`` [B, T, 4C] packed clean target latents, ``references`` [B, R, 4C] packed reference latents,
``img_ids`` int32 [B, T+R, 3] (4 axes for FLUX.2), ``img_mask`` bool [B, T+R] (False = padding), ``t5`` [B, L, D]
(FLUX.2: the Qwen3 prompt embeddings), ``pooled`` [B, Dp] (FLUX.2: Dp = 0).

Loss (diffusers Kontext LoRA training): ``x_t = (1 - σ) x0 + σ ε``, model input ``[x_t | references]`` with the
batch's ids, prediction of the target part vs ``ε - x0``; squared error averaged per sample over its real target
tokens x channels, times the σ weighting, then averaged over samples. Every random draw of a sample (σ, ε,
caption dropout) comes from ``fold_in(rng, sample index in the global batch)``, so ``grad_accum`` micro-batches
give exactly the gradient of one big batch.

Non-finite loss, gradients or updated adapters / optimizer state skip the update: adapters and optimizer state
stay as they were, ``nonfinite`` (consecutive) and ``skipped`` (total) count it, and the loop stops after
``optim.max_nonfinite`` in a row.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dreamomni2_jax.train import ema as ema_lib
from dreamomni2_jax import families
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.config import Config
from dreamomni2_jax.lora.layers import LoRAParam, reseed_dropout
from dreamomni2_jax.data.loss_mask import per_sample_loss
from dreamomni2_jax.layout.ids_flux1 import round_ids
from dreamomni2_jax.train.optimizers import logged_lr
from dreamomni2_jax.train.sigmas import loss_weighting, sample_sigmas

BATCH_KEYS = ("target", "references", "img_ids", "img_mask", "text", "pooled")
OPTIONAL_KEYS = ("loss_weight",)  # [B, T] float per-token loss weight (train.loss_mask; dreamomni2_jax.data.loss_mask)


def batch_keys(batch: dict) -> tuple[str, ...]:
    """The keys of ``batch`` the step takes: :data:`BATCH_KEYS` plus the optional ones present."""
    return BATCH_KEYS + tuple(k for k in OPTIONAL_KEYS if k in batch)


@struct.dataclass
class TrainState:
    """Everything the step reads and writes. ``frozen`` (base weights) is never saved by checkpoints; save
    :meth:`trainable` (plus the loop's data-iterator state)."""

    step: jax.Array  # int32: batches processed (including skipped ones)
    lora: nnx.State  # trainable adapters (LoRAParam)
    opt_state: Any
    nonfinite: jax.Array  # int32: consecutive skipped (non-finite) steps
    skipped: jax.Array  # int32: total skipped steps
    frozen: nnx.State  # base params and other non-trainable model variables
    empty_text: dict | None = None  # {"text": [L, D], "pooled": [Dp]} for caption dropout
    ema: nnx.State | None = None  # EMA of the adapters (train.ema_decay > 0; dreamomni2_jax.train.ema)

    def trainable(self) -> dict:
        """The part a checkpoint must save (everything but ``frozen`` / ``empty_text``)."""
        d = {"step": self.step, "lora": self.lora, "opt_state": self.opt_state, "nonfinite": self.nonfinite,
             "skipped": self.skipped}
        return d if self.ema is None else {**d, "ema": self.ema}

    def replace_trainable(self, d: dict) -> "TrainState":
        keys = ("step", "lora", "opt_state", "nonfinite", "skipped") + (("ema",) if self.ema is not None else ())
        return self.replace(**{k: d[k] for k in keys})


@dataclass(frozen=True)
class StepConfig:
    """Static (trace-time) settings of the step, read from the config."""

    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    guidance: float | None = 1.0  # None for models without a guidance embedder
    caption_dropout: float = 0.0
    grad_accum: int = 1
    lora_dropout: bool = False
    ids_dtype: str = "int32"  # model.ids_dtype (positions.round_ids)
    mask_floor: float = 0.0  # train.mask_floor (used when the batch has "loss_weight")
    ema_decay: float = 0.0
    ema_warmup: bool = False

    @classmethod
    def from_config(cls, cfg: Config, guidance_embeds: bool = True) -> "StepConfig":
        return cls(timestep_sampling=cfg.train.timestep_sampling, logit_mean=cfg.train.logit_mean,
                   logit_std=cfg.train.logit_std, mode_scale=cfg.train.mode_scale, weighting=cfg.train.weighting,
                   guidance=cfg.model.guidance if guidance_embeds else None,
                   caption_dropout=cfg.data.caption_dropout, grad_accum=cfg.optim.grad_accum,
                   lora_dropout=cfg.lora.dropout > 0, ids_dtype=cfg.model.ids_dtype, mask_floor=cfg.train.mask_floor,
                   ema_decay=cfg.train.ema_decay, ema_warmup=cfg.train.ema_warmup)


@dataclass(frozen=True, eq=False)
class StepStatics:
    """What the jitted step closes over: model graph, optimizer, lr schedule (for logging), settings, mesh."""

    graphdef: Any
    tx: optax.GradientTransformation
    lr_fn: Any
    cfg: StepConfig
    mesh: jax.sharding.Mesh | None = None


# --------------------------------------------------------------------------- loss


def _sample_keys(rng, sample_index, salt: int):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, salt), i))(sample_index)


def sample_draws(rng: jax.Array, sample_index: jax.Array, tokens: int, channels: int, seq_len: jax.Array,
                 cfg: StepConfig) -> dict:
    """Per-sample random draws of the loss: ``sigma`` [B], ``noise`` [B, tokens, channels], ``drop_caption``
    [B] bool. Sample ``i`` uses only ``fold_in(rng, sample_index[i])``; ``seq_len`` [B] = real target tokens."""
    sigmas = sample_sigmas(_sample_keys(rng, sample_index, 0), cfg.timestep_sampling, logit_mean=cfg.logit_mean,
                           logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, seq_len=seq_len)
    noise = jax.vmap(lambda k: jax.random.normal(k, (tokens, channels), jnp.float32))(
        _sample_keys(rng, sample_index, 1))
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, cfg.caption_dropout))(_sample_keys(rng, sample_index, 2))
    return {"sigma": sigmas, "noise": noise, "drop_caption": drop & (cfg.caption_dropout > 0)}


def flow_matching_loss(model, batch: dict, rng: jax.Array, sample_index: jax.Array, cfg: StepConfig,
                       empty_text: dict | None = None):
    """Mean weighted flow-matching loss of ``batch`` and aux metrics.

    ``sample_index`` [B]: each sample's index in the global batch (its random draws depend only on it, see
    :func:`sample_draws`). Returns ``(loss, {"sigma_mean", "loss_unweighted"})``."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; expected keys {BATCH_KEYS}")
    b, t, c = batch["target"].shape
    draws = sample_draws(rng, sample_index, t, c, batch["img_mask"][:, :t].astype(jnp.float32).sum(1), cfg)
    weighted, per_sample = per_sample_losses(model, batch, draws, cfg, empty_text)
    return jnp.mean(weighted), {"sigma_mean": jnp.mean(draws["sigma"]), "loss_unweighted": jnp.mean(per_sample)}


def per_sample_losses(model, batch: dict, draws: dict, cfg: StepConfig, empty_text: dict | None = None):
    """``(σ-weighted, unweighted)`` per-sample losses [B] of ``batch`` for the given ``draws`` (``sigma`` [B],
    ``noise`` [B, T, C], ``drop_caption`` [B]; :func:`sample_draws`, or fixed ones for the held-out loss)."""
    x0 = batch["target"].astype(jnp.float32)
    b, t, c = x0.shape
    mask = batch["img_mask"]
    tmask = mask[:, :t].astype(jnp.float32)
    sigmas, noise = draws["sigma"], draws["noise"]
    s = sigmas[:, None, None]
    x_t = (1.0 - s) * x0 + s * noise
    t5, pooled = batch["text"], batch["pooled"]
    if cfg.caption_dropout > 0:
        if empty_text is None:
            raise ValueError("caption dropout > 0 needs the empty-prompt embeddings (empty_text)")
        drop = draws["drop_caption"]
        t5 = jnp.where(drop[:, None, None], empty_text["text"][None].astype(t5.dtype), t5)
        pooled = jnp.where(drop[:, None], empty_text["pooled"][None].astype(pooled.dtype), pooled)
    hidden = jnp.concatenate([x_t, batch["references"].astype(jnp.float32)], axis=1)
    img_ids = round_ids(batch["img_ids"], cfg.ids_dtype)
    family = families.for_model(model)  # FLUX.1: pooled + 3-axis ids; FLUX.2: neither, 4-axis ids
    txt_ids = jnp.asarray(family.text_ids(t5.shape[1]), img_ids.dtype)
    pred = family.forward(model, hidden, t5, pooled, sigmas, img_ids, txt_ids, guidance=cfg.guidance,
                          attention_mask=mask, n_out=t)  # target tokens only: the reference outputs are unused
    err = jnp.square(pred.astype(jnp.float32) - (noise - x0))
    per_sample = per_sample_loss(err, tmask, batch.get("loss_weight"), cfg.mask_floor)
    return loss_weighting(sigmas, cfg.weighting) * per_sample, per_sample


def loss_and_grads(lora: nnx.State, frozen: nnx.State, batch: dict, rng: jax.Array, *, statics: "StepStatics",
                   empty_text: dict | None = None):
    """``((loss, aux), grads)`` of :func:`flow_matching_loss` w.r.t. the adapters, averaged over
    ``grad_accum`` micro-batches (micro-batch ``j`` = samples ``i * k + j``; each keeps its global index)."""
    cfg = statics.cfg
    batch = {k: batch[k] for k in batch_keys(batch)}
    b, k = batch["target"].shape[0], cfg.grad_accum
    if b % k:
        raise ValueError(f"batch of {b} samples does not split into grad_accum={k} micro-batches")

    def loss_fn(params, mb, idx):
        model = nnx.merge(statics.graphdef, params, frozen)
        return flow_matching_loss(model, mb, rng, idx, cfg, empty_text)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    index = jnp.arange(b, dtype=jnp.int32)
    if k == 1:
        return grad_fn(lora, batch, index)
    micro, micro_idx = _micro_batches(batch, k), _micro_batches({"i": index}, k)["i"]
    if statics.mesh is not None:
        micro = {n: jax.lax.with_sharding_constraint(v, jax.sharding.NamedSharding(
            statics.mesh, jax.sharding.PartitionSpec(None, shd.batch_axes(statics.mesh), *([None] * (v.ndim - 2)))))
            for n, v in micro.items()}

    def body(carry, xs):
        (l, a), g = grad_fn(lora, *xs)
        return jax.tree.map(jnp.add, carry, ((l, a), g)), None

    zero = jnp.zeros((), jnp.float32)
    init = ((zero, {"sigma_mean": zero, "loss_unweighted": zero}), jax.tree.map(jnp.zeros_like, lora))
    total, _ = jax.lax.scan(body, init, (micro, micro_idx))
    return jax.tree.map(lambda x: x / k, total)


def _micro_batches(batch: dict, k: int):
    """[B, ...] -> [k, B/k, ...] with micro-batch j = samples {i*k + j}: each device keeps its own rows."""
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(split, batch)


# --------------------------------------------------------------------------- step


def _all_finite(tree) -> jax.Array:
    oks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(oks).all() if oks else jnp.bool_(True)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, statics: StepStatics):
    """One optimizer update (``grad_accum`` micro-batches) -> ``(new_state, metrics)``; pure.

    Traced under ``statics.mesh`` (as the context abstract mesh), so attention kernels run per shard and
    ``attention="auto"`` picks the kernel of the mesh's devices."""
    if statics.mesh is not None and jax.sharding.get_abstract_mesh().empty:
        with jax.sharding.use_abstract_mesh(statics.mesh.abstract_mesh):
            return train_step(state, batch, rng, statics=statics)
    frozen = reseed_dropout(state.frozen, jax.random.fold_in(rng, 7)) if statics.cfg.lora_dropout else state.frozen
    (loss, aux), grads = loss_and_grads(state.lora, frozen, batch, rng, statics=statics,
                                        empty_text=state.empty_text)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = statics.tx.update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    # finite loss and gradients are not enough (a NaN / inf learning rate or an overflowing optimizer moment
    # makes the update itself non-finite): the new adapters and optimizer state must be finite too
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(lora) & _all_finite(opt_state)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    applied = state.step - state.skipped
    if state.ema is not None:
        new_ema = ema_lib.update(state.ema, lora, ema_lib.decay_at(applied, statics.cfg.ema_decay,
                                                                   statics.cfg.ema_warmup))
        state = state.replace(ema=keep(new_ema, state.ema))
    new_state = state.replace(
        step=state.step + 1,
        lora=keep(lora, state.lora),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite=jnp.where(ok, 0, state.nonfinite + 1).astype(jnp.int32),
        skipped=(state.skipped + jnp.where(ok, 0, 1)).astype(jnp.int32),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(statics.lr_fn(applied), jnp.float32),
               "finite": ok, "nonfinite": new_state.nonfinite, **aux}
    return new_state, metrics


# --------------------------------------------------------------------------- set-up


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, mesh=None,
                     empty_text: dict | None = None, ema: bool = False) -> tuple[Any, TrainState]:
    """Split an adapted model into ``(graphdef, TrainState)``; with ``mesh``, place adapters / optimizer state by
    the sharding rules (base weights already placed by ``load_flux(param_sharding=...)`` are not copied).
    An abstract model (``nnx.eval_shape``) gives an abstract state: ``ShapeDtypeStruct`` leaves with shardings.
    ``ema``: keep an EMA of the adapters (a copy of them, same shardings)."""
    model.train()  # LoRA dropout active inside the step
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    if not jax.tree.leaves(lora):
        raise ValueError("model has no LoRA parameters: call lora.apply_lora first")
    if mesh is not None:
        lora_sh = shd.model_state_shardings(lora, mesh, by_path=False)
        lora = shd.place(lora, lora_sh)
        frozen = shd.place(frozen, shd.model_state_shardings(frozen, mesh))
        opt_sh = shd.like_params(jax.eval_shape(tx.init, lora), lora, lora_sh, mesh)
        if _abstract(lora):  # shapes only (ahead-of-time compilation): nothing allocated
            opt_state = shd.place(jax.eval_shape(tx.init, lora), opt_sh)
        else:
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(lora)
        if empty_text is not None:
            empty_text = shd.place(empty_text, jax.tree.map(lambda _: shd.replicated(mesh), empty_text))
    else:
        opt_state = tx.init(lora)
    def zero():  # distinct buffers: the state is donated
        z = jax.ShapeDtypeStruct((), jnp.int32) if _abstract(lora) else jnp.zeros((), jnp.int32)
        return z if mesh is None else shd.place(z, shd.replicated(mesh))

    state = TrainState(step=zero(), lora=lora, opt_state=opt_state, nonfinite=zero(), skipped=zero(),
                       frozen=frozen, empty_text=empty_text, ema=ema_lib.init(lora) if ema else None)
    return graphdef, state


def _abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def make_statics(graphdef, cfg: Config, *, tx: optax.GradientTransformation, guidance_embeds: bool,
                 total_steps: int | None = None, mesh=None) -> StepStatics:
    """Step statics; ``tx`` is the optimizer the state was initialised with (:func:`optimizers.make_optimizer`,
    built once by the caller)."""
    total = cfg.train.steps if total_steps is None else total_steps
    return StepStatics(graphdef=graphdef, tx=tx, lr_fn=logged_lr(cfg.optim, total),
                       cfg=StepConfig.from_config(cfg, guidance_embeds), mesh=mesh)


def compile_train_step(statics: StepStatics, state: TrainState, batch_example: dict):
    """``jax.jit`` of :func:`train_step` with explicit in/out shardings and the state donated.

    Without a mesh, plain jit (donation only). ``batch_example``: arrays or ShapeDtypeStructs with the batch's
    shapes (only ``ndim`` is used)."""
    step = functools.partial(train_step, statics=statics)
    if statics.mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    mesh = statics.mesh
    state_sh = shd.shardings_of(state)
    batch_sh = {k: shd.batch_sharding(mesh, len(batch_example[k].shape)) for k in batch_keys(batch_example)}
    rep = shd.replicated(mesh)
    return jax.jit(step, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))
