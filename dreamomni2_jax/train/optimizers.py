"""The optimizers of ``optim.name``, all from optax / optax.contrib (no hand-written update rule).

* ``adamw``: ``optax.adamw`` (``b1``, ``b2``, ``eps``, ``weight_decay``) with :func:`lr_schedule`;
* ``prodigy``: ``optax.contrib.prodigy`` (learning-rate-free: ``optim.lr`` multiplies its own estimate, use 1.0;
  ``betas=(b1, b2)``, ``eps``, ``weight_decay``, ``estim_lr_coef=prodigy_d_coef``);
* ``schedule_free_adamw``: ``optax.contrib.schedule_free_adamw`` (``lr``, its own ``schedule_free_warmup``, ``b1``,
  ``b2``, ``eps``, ``weight_decay``; no external schedule). The trained point ``y`` is what the state holds; the
  point to evaluate / export is ``x`` (:func:`eval_params`), which sampling and export use;
* ``muon``: ``optax.contrib.muon`` (``lr``, ``beta=b1``, ``ns_steps=muon_ns_steps``, ``weight_decay``); every LoRA
  factor is a matrix, so all adapters get the orthogonalised update;
* ``adafactor``: ``optax.adafactor`` (``lr`` schedule, ``min_dim_size_to_factor``,
  ``multiply_by_parameter_scale=adafactor_parameter_scale`` (off: LoRA's B starts at zero), ``weight_decay_rate``
  = ``weight_decay`` when > 0).

Global-norm clipping (``optim.grad_clip`` > 0) runs before each of them. The optimizer state is a pytree like
any other: ``sharding.like_params`` places the parameter-shaped parts like the adapters (factored Adafactor
moments, scalars replicated) and checkpoints save and restore it exactly.
"""
from __future__ import annotations

from typing import Any

import optax

from dreamomni2_jax.config import OptimConfig

NAMES = ("adamw", "prodigy", "schedule_free_adamw", "muon", "adafactor")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``cfg.lr`` over ``warmup_steps`` updates, then constant or cosine decay to 0 at
    ``total_steps``."""
    warm = cfg.warmup_steps
    if cfg.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)],
                                    [warm])
    decay = max(total_steps - warm, 1)
    cosine = optax.cosine_decay_schedule(cfg.lr, decay)
    if warm == 0:
        return cosine
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), cosine], [warm])


def logged_lr(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate the loop logs after ``n`` applied updates."""
    if cfg.name == "schedule_free_adamw":
        warm = cfg.schedule_free_warmup
        if warm == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)],
                                    [warm])
    return lr_schedule(cfg, total_steps)


def _base(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    from optax import contrib

    lr = lr_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "prodigy":
        return contrib.prodigy(lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                               estim_lr_coef=cfg.prodigy_d_coef)
    if cfg.name == "schedule_free_adamw":
        return contrib.schedule_free_adamw(cfg.lr, warmup_steps=cfg.schedule_free_warmup or None, b1=cfg.b1,
                                           b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "muon":
        return contrib.muon(lr, ns_steps=cfg.muon_ns_steps, beta=cfg.b1, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        return optax.adafactor(lr, min_dim_size_to_factor=cfg.adafactor_min_dim_size_to_factor,
                               multiply_by_parameter_scale=cfg.adafactor_parameter_scale,
                               weight_decay_rate=cfg.weight_decay or None)
    raise ValueError(f"optim.name={cfg.name!r} is not one of {NAMES}")


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if ``grad_clip`` > 0) then the optimizer of ``cfg.name``."""
    tx = _base(cfg, total_steps)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip > 0 else tx


def eval_params(cfg: OptimConfig, opt_state: Any, params: Any) -> Any:
    """The adapters to sample / export with: ``params`` itself, except schedule-free AdamW's ``x`` point."""
    if cfg.name != "schedule_free_adamw":
        return params
    from optax import contrib

    state = opt_state[1] if cfg.grad_clip > 0 else opt_state  # chain(clip, schedule_free)
    return contrib.schedule_free_eval_params(state, params)


def saved_eval_params(opt_state: Any, params: Any) -> Any:
    """:func:`eval_params` for a checkpoint restored without its types (``checkpoint.load_state``: named tuples
    come back as dicts / lists): schedule-free AdamW's ``x`` when the state holds its ``z`` and ``b1``, else
    ``params``."""
    from types import SimpleNamespace

    from optax import contrib

    parts = opt_state if isinstance(opt_state, (list, tuple)) else [opt_state]
    sf = [p for p in parts if isinstance(p, dict) and "z" in p and "b1" in p]
    if not sf:
        return params
    return contrib.schedule_free_eval_params(SimpleNamespace(b1=sf[0]["b1"], z=sf[0]["z"]), params)
