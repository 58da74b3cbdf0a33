"""Analytic FLOPs of a Flux (FLUX.1 / FLUX.2) LoRA train step, peak FLOP/s per device kind, and MFU.

FLOPs are "model FLOPs" of the shapes actually executed (padded lengths), 2 per multiply-add, remat recompute
not counted (the MFU convention). With frozen base weights the backward pass computes activation gradients
only, and only where they lead back to an adapter: 1x the forward matmul FLOPs for the blocks' linear layers
(``dX = dY Wᵀ``, no ``dW``), 2x for attention (``dQ``, ``dK`` from ``dS``; ``dP``, ``dV`` from ``dO``) and
nothing for the embedders / adaLN linears (their inputs do not depend on the adapters). A step costs
``embed + 2 x linear + 3 x attention + 3 x adapters`` forward FLOPs (adapters: forward, activation and weight
gradients). ``tests/test_train_step.py`` checks this against the dot products of the traced step.
"""
from __future__ import annotations

from typing import Mapping

import jax

from dreamomni2_jax.models.roles import NO_BACKWARD_ROLES, SchemaError
from dreamomni2_jax.models.schemas import schema_for
from dreamomni2_jax.lora.layers import lora_modules

# Dense bf16 peak FLOP/s per chip / GPU (vendor figures).
PEAK_FLOPS: dict[str, float] = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
}


def peak_flops(device=None) -> float | None:
    """Peak bf16 FLOP/s of one device (``jax.devices()[0]`` by default); None for CPUs / unknown kinds."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific first ("tpu v5 lite" before "tpu v5")
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def _rows(lin, s_i: int, s_t: int, o: int) -> int:
    """Rows one application of ``lin`` sees per sample (``o``: output image tokens)."""
    return {"image": s_i, "text": s_t, "joint": s_i + s_t, "output": o, "vector": 1}[lin.stream]


def _layer_rows(lin, n: int, s_i: int, s_t: int, o: int) -> int:
    """Rows over the ``n`` layers of ``lin``: in the last single-stream layer only the ``o`` output rows, unless
    the Linear runs on every row there (keys / values, a fused input projection)."""
    rows = n * _rows(lin, s_i, s_t, o)
    if lin.stream == "joint" and not lin.full_rows and n > 0:
        rows -= s_i + s_t - o
    return rows


def flux_forward_macs(config, image_tokens: int, text_tokens: int, out_tokens: int | None = None) -> dict[str, float]:
    """Multiply-adds of one Flux (FLUX.1 or FLUX.2) forward pass for one sample, by how the backward pass treats
    them; one row per Linear of the model's schema (``models/<model>_schema.py``).

    ``config``: a ``FluxConfig`` / ``Flux2Config``; ``image_tokens`` = target + reference tokens (padded),
    ``text_tokens`` = text length. ``"embed"``: matmuls whose inputs never depend on the adapters (roles ``embed``
    and ``mod``: x / context / time / text embedders, every adaLN modulation linear): no backward. ``"linear"``:
    token matmuls of the blocks and the output projection (activation gradient in the backward). ``"attention"``:
    ``QKᵀ`` and ``PV``."""
    # out_tokens: image tokens whose outputs are computed (the last single block computes only their query / MLP /
    # output rows; keys and values over all rows). None = all image tokens.
    schema = schema_for(config)
    s_i, s_t = image_tokens, text_tokens
    s, d = s_i + s_t, config.inner_dim
    o = s_i if out_tokens is None else out_tokens
    out = {"embed": 0.0, "linear": 0.0}
    for lin in schema.present(config):
        din, dout = schema.dims(lin, config)
        kind = "embed" if lin.role in NO_BACKWARD_ROLES else "linear"
        out[kind] += _layer_rows(lin, schema.count(lin, config), s_i, s_t, o) * din * dout
    attention = ((config.num_layers + config.num_single_layers) * 2 * s * s * d
                 - (config.num_single_layers > 0) * 2 * (s - o) * s * d)
    return {"embed": float(out["embed"]), "linear": float(out["linear"]), "attention": float(attention)}


def lora_dims(model) -> dict[str, tuple[int, int, int, int]]:
    """``{path: (layers, in, out, rank)}`` of the adapters in ``model`` (for :func:`flux_train_flops`)."""
    out = {}
    for path, m in lora_modules(model).items():
        *lead, din, r = m.lora_A.shape
        layers = 1
        for n in lead:
            layers *= n
        out[path] = (layers, din, m.lora_B.shape[-1], r)
    return out


def flux_train_flops(config, batch_layout, text_len: int, lora: Mapping[str, tuple[int, int, int, int]] = (),
                     out_tokens: int | None = None) -> float:
    """FLOPs of one LoRA train step (one optimizer update over the whole global batch; see module docstring).

    ``batch_layout``: a ``positions.BatchLayout`` (batch size and padded target + reference lengths) or a tuple
    ``(batch, target_len, reference_len)``; ``text_len``: text tokens; ``lora``: :func:`lora_dims` (adapters on
    per-sample vectors counted once per sample). Every adapted path must be declared by the model's schema."""
    if isinstance(batch_layout, tuple):
        batch, t, r = batch_layout
    else:
        batch, t, r = batch_layout.ids.shape[0], batch_layout.target_len, batch_layout.reference_len
    schema = schema_for(config)
    s_i = t + r
    o = t if out_tokens is None else out_tokens  # the train step computes the target tokens' outputs only
    macs = flux_forward_macs(config, s_i, text_len, o)
    lora_macs = 0.0
    for path, (layers, din, dout, rank) in dict(lora).items():
        lin = schema.find(path)
        if lin is None:
            raise SchemaError(f"{path}: adapted module not declared by the {schema.name} schema")
        lora_macs += _layer_rows(lin, layers, s_i, text_len, o) * rank * (din + dout)
    per_sample = macs["embed"] + 2 * macs["linear"] + 3 * macs["attention"] + 3 * lora_macs
    return 2.0 * batch * per_sample


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, device=None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None where the peak is unknown (CPU: report FLOP/s instead)."""
    peak = peak_flops(device)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * n_devices)
