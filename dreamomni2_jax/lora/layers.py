"""LoRA adapters injected into an NNX model from outside the model code.

:func:`apply_lora` walks the model's modules, matches dotted module paths (``transformer_blocks.attn.to_q``,
``attn.to_out.0``; stacked blocks have no layer index in the path) with ``re.search`` against the configured
patterns, and replaces every matched ``nnx.Linear`` by a :class:`LoRALinear` that keeps the base ``kernel`` /
``bias`` (same names, same Variables) and adds ``lora_A`` ``[..., in, r]`` and ``lora_B`` ``[..., r, out]`` as
:class:`LoRAParam` (an ``nnx.Param`` subclass, so ``nnx.split(model, LoRAParam, ...)`` separates the adapters).
Adapters of a stacked ``Linear`` (kernel ``[L, in, out]``) get the same leading layer axis.

Math is peft's: ``y = base(x) + (dropout(x) @ A @ B) * alpha / rank`` with ``B = 0``, so a fresh adapter leaves the
model unchanged, and ``A`` drawn as peft's ``init_lora_weights``: ``gaussian`` (the default, as diffusers' Kontext
script and qflux use): ``N(0, (1/rank)²)``; ``kaiming`` (peft's ``True``): Kaiming-uniform (``a=sqrt(5)``, i.e.
``U(-1/sqrt(in), 1/sqrt(in))``), ≈6x smaller at Flux widths (in=3072, rank 16), so B's early gradients are smaller.

The flat-dict helpers (:func:`lora_state`, :func:`set_lora_state`, :func:`lora_metadata`) are the interface for
LoRA export/import: keys are ``<dotted module path>.lora_A`` / ``.lora_B`` (DoRA: and ``.lora_magnitude_vector``);
stacked modules keep the layer axis.

``variant="dora"`` (``lora.variant``) adds peft's DoRA magnitude vector ``lora_magnitude_vector`` ``[..., out]`` (a
:class:`LoRAParam`, so it trains, shards, averages and checkpoints with the adapters); the math is in
:mod:`dreamomni2_jax.lora.dora`.
"""
from __future__ import annotations

import re
import warnings
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamomni2_jax.lora import dora
from dreamomni2_jax.lora.adapters import LoraError
from dreamomni2_jax.utils.tree_paths import dotted

__all__ = ["LORA_INITS", "init_lora_a", "LoRAParam", "LoRADropoutKey", "LoRALinear", "apply_lora", "lora_modules",
           "lora_state", "reset_magnitudes", "set_lora_state", "lora_metadata", "linear_paths", "reseed_dropout",
           "LoraError"]


class LoRAParam(nnx.Param):
    """A trainable LoRA adapter weight (``lora_A`` / ``lora_B``; DoRA: ``lora_magnitude_vector``)."""


class LoRADropoutKey(nnx.Variable):
    """Raw PRNG key data (``[..., *key_shape]`` uint32) for LoRA dropout, one per module and layer.

    Not a parameter: the train step overwrites it every step (:func:`reseed_dropout`)."""


def _key_data_shape() -> tuple[int, ...]:
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


LORA_INITS = ("gaussian", "kaiming")


def init_lora_a(key: jax.Array, shape: tuple[int, ...], init: str) -> jax.Array:
    """float32 ``lora_A`` ``[..., in, rank]`` drawn like peft's ``reset_lora_parameters`` (see the module doc)."""
    din, rank = shape[-2], shape[-1]
    if init == "gaussian":  # nn.init.normal_(lora_A.weight, std=1 / r)
        return jax.random.normal(key, shape, jnp.float32) / rank
    if init == "kaiming":  # nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5)) on torch weight [r, in]
        bound = 1.0 / np.sqrt(din)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    raise LoraError(f"LoRA init {init!r} is not one of {list(LORA_INITS)}")


class LoRALinear(nnx.Linear):
    """``nnx.Linear`` plus a low-rank update; built from an existing Linear (whose Variables it reuses).

    ``kernel`` may carry leading (layer) axes ``[..., in, out]``; the adapters get the same ones. Dropout is
    active only when ``deterministic`` is False (``model.train()`` / ``model.eval()`` toggle it).
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, key: jax.Array, dropout: float = 0.0,
                 dtype=jnp.float32, init: str = "gaussian", variant: str = "lora"):
        if isinstance(base, LoRALinear):
            raise LoraError("module already has a LoRA adapter")
        for name in ("kernel", "bias", "in_features", "out_features", "use_bias", "dtype", "param_dtype",
                     "precision", "dot_general", "promote_dtype", "preferred_element_type"):
            setattr(self, name, getattr(base, name))
        *lead, din, dout = self.kernel.shape
        self.lora_A = LoRAParam(init_lora_a(key, (*lead, din, rank), init).astype(dtype))
        self.lora_B = LoRAParam(jnp.zeros((*lead, rank, dout), dtype))
        self.lora_rank, self.lora_alpha, self.lora_scale = int(rank), float(alpha), float(alpha) / rank
        if variant not in dora.VARIANTS:
            raise LoraError(f"LoRA variant {variant!r} is not one of {list(dora.VARIANTS)}")
        self.lora_variant = variant
        if variant == "dora":  # peft: m = ||W + scale * B @ A|| of the initial adapters
            self.lora_magnitude_vector = LoRAParam(dora.weight_norm(
                self.kernel[...], self.lora_A[...], self.lora_B[...], self.lora_scale).astype(dtype))
        self.lora_dropout = float(dropout)
        self.deterministic = True
        if dropout > 0:
            self.lora_dropout_key = LoRADropoutKey(jnp.zeros((*lead, *_key_data_shape()), jnp.uint32))

    def __call__(self, inputs, out_sharding=None):
        y = super().__call__(inputs, out_sharding=out_sharding)
        x = inputs
        dropped = self.lora_dropout > 0 and not self.deterministic
        if dropped:
            key = jax.random.wrap_key_data(self.lora_dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), jnp.zeros_like(x))
        a, b = self.lora_A[...], self.lora_B[...]
        cdt = self.dtype if self.dtype is not None else jnp.result_type(x, a)
        if self.lora_variant == "dora":
            return dora.output(y, x, kernel=self.kernel[...], bias=self.bias[...] if self.bias is not None else None,
                               lora_a=a, lora_b=b, magnitude=self.lora_magnitude_vector[...], scale=self.lora_scale,
                               cdt=cdt, dropped=dropped)
        delta = (x.astype(cdt) @ a.astype(cdt)) @ b.astype(cdt)
        return y + (delta * jnp.asarray(self.lora_scale, cdt)).astype(y.dtype)


def linear_paths(model: nnx.Module) -> list[str]:
    """Dotted paths of every plain ``nnx.Linear`` (not yet adapted) in ``model``."""
    return [dotted(p) for p, m in nnx.iter_modules(model)
            if isinstance(m, nnx.Linear) and not isinstance(m, LoRALinear)]


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """``{dotted path: LoRALinear}`` of the adapted modules, in path order."""
    return dict(sorted((dotted(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)))


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


def apply_lora(model: nnx.Module, patterns: Iterable[str], *, rank: int, alpha: float, dropout: float = 0.0,
               dtype=jnp.float32, seed: int | jax.Array = 0, init: str = "gaussian",
               variant: str = "lora") -> tuple[str, ...]:
    """Replace every ``nnx.Linear`` whose dotted path ``re.search``-matches a pattern by a :class:`LoRALinear`.

    Returns the adapted paths (sorted). Raises :class:`LoraError` listing the available Linear paths when nothing
    matches; patterns that match nothing (e.g. single-block targets on a model without single blocks) are
    reported with a warning. ``seed``: int or PRNG key for the ``lora_A`` init (one fold per path); ``init``: one of
    :data:`LORA_INITS`; ``variant``: ``"lora"`` or ``"dora"`` (adds the DoRA magnitude vector).
    """
    patterns = tuple(patterns)
    if init not in LORA_INITS:
        raise LoraError(f"LoRA init {init!r} is not one of {list(LORA_INITS)}")
    if variant not in dora.VARIANTS:
        raise LoraError(f"LoRA variant {variant!r} is not one of {list(dora.VARIANTS)}")
    if not patterns:
        raise LoraError("no LoRA target patterns given")
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise LoraError(f"invalid LoRA target regex: {e}") from None
    if any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model)):
        raise LoraError("model already has LoRA adapters (apply_lora was called twice?)")
    candidates = sorted(((dotted(p), tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)),
                        key=lambda t: t[0])
    hits = {p: 0 for p in patterns}
    matched = []
    for name, path, module in candidates:
        found = [p for p, rx in zip(patterns, compiled) if rx.search(name)]
        for p in found:
            hits[p] += 1
        if found:
            matched.append((name, path, module))
    if not matched:
        raise LoraError(f"LoRA target patterns {list(patterns)} match no Linear module; available paths: "
                        f"{[c[0] for c in candidates]}")
    unused = [p for p, n in hits.items() if n == 0]
    if unused:
        warnings.warn(f"LoRA target patterns matched nothing and were ignored: {unused}", stacklevel=2)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    for i, (name, path, module) in enumerate(matched):
        new = LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout, dtype=dtype, key=jax.random.fold_in(key, i),
                         init=init, variant=variant)
        _replace(model, path, new)
    return tuple(m[0] for m in matched)


def _adapter_vars(m: LoRALinear) -> tuple[str, ...]:
    return ("lora_A", "lora_B") + ((dora.MAGNITUDE,) if m.lora_variant == "dora" else ())


def lora_state(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat ``{"<module path>.lora_A" | ".lora_B" | ".lora_magnitude_vector" (DoRA): array}`` of every adapter
    (stacked ones keep the layer axis)."""
    return {f"{name}.{k}": getattr(m, k)[...] for name, m in lora_modules(model).items() for k in _adapter_vars(m)}


def set_lora_state(model: nnx.Module, flat: Mapping[str, jax.Array]) -> None:
    """Load adapter arrays (format of :func:`lora_state`); keys and shapes must match exactly.

    Arrays are cast to each adapter's dtype and keep the sharding of the array given."""
    modules = lora_modules(model)
    expected = {f"{n}.{k}": getattr(m, k) for n, m in modules.items() for k in _adapter_vars(m)}
    missing, unknown = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unknown:
        raise LoraError(f"LoRA state mismatch: missing keys {missing}, unknown keys {unknown}")
    for key, var in expected.items():
        value = flat[key]
        if tuple(value.shape) != tuple(var.shape):
            raise LoraError(f"LoRA state {key!r}: shape {tuple(value.shape)} != model's {tuple(var.shape)}")
        var[...] = jnp.asarray(value, dtype=var.dtype)


def lora_metadata(model: nnx.Module) -> dict:
    """``{"rank", "alpha", "dropout", "variant", "targets": [dotted module paths]}`` of the adapted model."""
    modules = lora_modules(model)
    if not modules:
        raise LoraError("model has no LoRA adapters")
    ranks = {m.lora_rank for m in modules.values()}
    alphas = {m.lora_alpha for m in modules.values()}
    variants = {m.lora_variant for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1 or len(variants) != 1:
        raise LoraError(f"adapters have mixed rank/alpha/variant: ranks {sorted(ranks)}, alphas {sorted(alphas)}, "
                        f"variants {sorted(variants)}")
    return {"rank": ranks.pop(), "alpha": alphas.pop(), "dropout": next(iter(modules.values())).lora_dropout,
            "variant": variants.pop(), "targets": list(modules)}


def reset_magnitudes(model: nnx.Module) -> None:
    """Set every DoRA magnitude to the norm of its current adapted weight (``W + scale * A @ B``): the DoRA layer then
    computes exactly what the plain LoRA with these ``A`` / ``B`` computes (used to start DoRA from a LoRA file)."""
    for m in lora_modules(model).values():
        if m.lora_variant == "dora":
            m.lora_magnitude_vector[...] = dora.weight_norm(m.kernel[...], m.lora_A[...], m.lora_B[...],
                                                            m.lora_scale).astype(m.lora_magnitude_vector.dtype)


def reseed_dropout(state: nnx.State, rng: jax.Array) -> nnx.State:
    """Return ``state`` with every :class:`LoRADropoutKey` leaf replaced by fresh key data derived from ``rng``
    (distinct per module and per layer). Other leaves pass through unchanged; pure, usable under jit."""
    flat = nnx.to_flat_state(state)
    out = []
    for i, (path, var) in enumerate(flat):
        if isinstance(var, LoRADropoutKey):
            shape = var.shape
            n = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            keys = jax.random.split(jax.random.fold_in(rng, i), n)
            var = var.replace(jax.random.key_data(keys).reshape(shape).astype(jnp.uint32))
        out.append((path, var))
    return nnx.from_flat_state(out)
