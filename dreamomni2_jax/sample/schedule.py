"""FlowMatch Euler sampling schedule with resolution-dependent ("dynamic") shift, as Flux Kontext uses it.

Host-side schedule (numpy float32, same operations as diffusers): ``calculate_shift`` (``mu`` from the target's
token count, linear between ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len``)
and ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=np.linspace(1, 1/steps, steps), mu=mu)``.
Device-side step: :func:`euler_step` (``x + (sigma_next - sigma) * v`` in float32), usable inside ``lax.scan``.

Options of the diffusers scheduler that Flux Kontext does not use (karras / exponential / beta sigmas, inverted
sigmas, stochastic sampling) are rejected when a ``scheduler_config.json`` enables them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling")


@dataclass(frozen=True)
class FlowMatchConfig:
    """``scheduler/scheduler_config.json`` fields (diffusers ``FlowMatchEulerDiscreteScheduler``); defaults = Flux."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"  # exponential | linear
    shift_terminal: float | None = None

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"scheduler time_shift_type={self.time_shift_type!r}: expected exponential or linear")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "FlowMatchConfig":
        """From a diffusers scheduler config; ``_`` keys ignored, enabled unsupported options are an error."""
        name = d.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{source}: scheduler class {name!r} is not supported (FlowMatchEulerDiscreteScheduler)")
        bad = [k for k in _UNSUPPORTED if d.get(k)]
        if bad:
            raise ValueError(f"{source}: scheduler options {bad} are not supported by this sampler")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        if d.get("shift_terminal"):
            kw["shift_terminal"] = float(d["shift_terminal"])
        for k in ("base_shift", "max_shift"):  # null in some configs means "the default"
            if d.get(k, 0) is None:
                kw.pop(k, None)
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "FlowMatchConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: scheduler config missing")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))


def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15):
    """``mu`` for dynamic shifting: linear in the target image's token count (diffusers ``calculate_shift``).

    Plain arithmetic: an int gives a float (sampler), an array gives an array (training's ``sigmoid_shift``).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flux_sigmas(steps: int) -> np.ndarray:
    """The unshifted sigmas the Flux pipelines pass: ``linspace(1, 1/steps, steps)`` (float64)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return np.linspace(1.0, 1.0 / steps, steps)


def time_shift(mu, t, sigma: float = 1.0, kind: str = "exponential"):
    """diffusers ``FlowMatchEulerDiscreteScheduler._time_shift_exponential`` (``kind="linear"``: ``_linear``).

    A Python-number ``mu`` (the sampler's host-side numpy schedule) is exponentiated with ``math.exp`` as diffusers
    does; an array ``mu`` (training's per-sample ``sigmoid_shift``, traced) with ``jnp.exp``.
    """
    if kind == "linear":
        m = mu
    else:
        m = jnp.exp(mu) if isinstance(mu, jax.Array) else math.exp(mu)
    return m / (m + (1.0 / t - 1.0) ** sigma)


def set_timesteps(cfg: FlowMatchConfig, steps: int, image_seq_len: int | None = None,
                  sigmas=None, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps [steps], sigmas [steps + 1])`` float32, as diffusers' ``set_timesteps(sigmas=..., mu=...)``.

    ``sigmas`` default to :func:`flux_sigmas`; ``mu`` defaults to :func:`calculate_shift` of ``image_seq_len``
    (needed when ``use_dynamic_shifting``). Timesteps are in the scheduler's 0..num_train_timesteps units; the last
    sigma is the terminal 0.
    """
    sig = np.asarray(flux_sigmas(steps) if sigmas is None else sigmas).astype(np.float32)
    if sig.ndim != 1 or len(sig) != steps:
        raise ValueError(f"sigmas must have {steps} values, got shape {sig.shape}")
    if cfg.use_dynamic_shifting:
        if mu is None:
            if image_seq_len is None:
                raise ValueError("dynamic shifting needs image_seq_len or mu")
            mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len,
                                 cfg.base_shift, cfg.max_shift)
        sig = time_shift(mu, sig, kind=cfg.time_shift_type)
    else:
        sig = cfg.shift * sig / (1 + (cfg.shift - 1) * sig)
    if cfg.shift_terminal:
        one_minus_z = 1 - sig
        sig = 1 - one_minus_z / (one_minus_z[-1] / (1 - cfg.shift_terminal))
    sig = sig.astype(np.float32)
    timesteps = (sig * np.float32(cfg.num_train_timesteps)).astype(np.float32)
    return timesteps, np.concatenate([sig, np.zeros(1, np.float32)])


def euler_step(sample, model_output, sigma, sigma_next):
    """One FlowMatch Euler step ``sample + (sigma_next - sigma) * model_output`` (float32 math, output dtype)."""
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    out = sample.astype(jnp.float32) + dt * model_output.astype(jnp.float32)
    return out.astype(model_output.dtype)
