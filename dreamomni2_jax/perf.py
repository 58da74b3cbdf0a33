"""Analytic FLOPs of a Flux LoRA train step, peak FLOP/s per device kind, and MFU.

FLOPs are "model FLOPs" of the shapes actually executed (padded lengths), 2 per multiply-add, remat recompute
not counted (the MFU convention). With frozen base weights the backward pass computes activation gradients
only, and only where they lead back to an adapter: 1x the forward matmul FLOPs for the blocks' linear layers
(``dX = dY Wᵀ``, no ``dW``), 2x for attention (``dQ``, ``dK`` from ``dS``; ``dP``, ``dV`` from ``dO``) and
nothing for the embedders / adaLN linears (their inputs do not depend on the adapters). A step costs
``embed + 2 x linear + 3 x attention + 3 x adapters`` forward FLOPs (adapters: forward, activation and weight
gradients). ``tests/test_train_step.py`` checks this against the dot products of the traced step.
"""
from __future__ import annotations

import re
from typing import Mapping

import jax

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


def flux_forward_macs(config, image_tokens: int, text_tokens: int, out_tokens: int | None = None) -> dict[str, float]:
    """Multiply-adds of one Flux forward pass for one sample, by how the backward pass treats them.

    ``config``: a ``FluxConfig``; ``image_tokens`` = target + reference tokens (padded), ``text_tokens`` = T5
    length. ``"embed"``: matmuls whose inputs never depend on the adapters (x / context / time / text
    embedders, every adaLN modulation linear): no backward. ``"linear"``: token matmuls of the blocks and the
    output projection (activation gradient in the backward). ``"attention"``: ``QKᵀ`` and ``PV``."""
    # out_tokens: image tokens whose outputs are computed (the last single block computes only their query / MLP /
    # output rows; keys and values over all rows). None = all image tokens.
    d, m = config.inner_dim, 4 * config.inner_dim
    s_i, s_t = image_tokens, text_tokens
    s = s_i + s_t
    n_emb = 2 if config.guidance_embeds else 1
    embed = (n_emb * (256 * d + d * d) + config.pooled_projection_dim * d + d * d  # time / guidance / text
             + config.num_layers * 2 * d * 6 * d + config.num_single_layers * d * 3 * d + d * 2 * d  # adaLN
             + s_i * config.in_channels * d + s_t * config.joint_attention_dim * d)  # x / context embedders
    o = s_i if out_tokens is None else out_tokens
    single = s * (3 * d * d + d * m + (d + m) * d)  # qkv + mlp + proj_out
    last = s * 2 * d * d + o * (d * d + d * m + (d + m) * d)  # k, v over all rows; q + mlp + proj_out over o
    linear = (o * d * config.out_dim
              + config.num_layers * s * (4 * d * d + 2 * d * m)  # qkv + out + MLP, both streams
              + (config.num_single_layers > 0) * (last + (config.num_single_layers - 1) * single))
    attention = ((config.num_layers + config.num_single_layers) * 2 * s * s * d
                 - (config.num_single_layers > 0) * 2 * (s - o) * s * d)
    return {"embed": float(embed), "linear": float(linear), "attention": float(attention)}


def lora_dims(model) -> dict[str, tuple[int, int, int, int]]:
    """``{path: (layers, in, out, rank)}`` of the adapters in ``model`` (for :func:`flux_train_flops`)."""
    from dreamomni2_jax.lora import lora_modules

    out = {}
    for path, m in lora_modules(model).items():
        *lead, din, r = m.lora_A.shape
        layers = 1
        for n in lead:
            layers *= n
        out[path] = (layers, din, m.lora_B.shape[-1], r)
    return out


def _lora_tokens(path: str, s_i: int, s_t: int) -> int:
    """Rows an adapted Linear sees per sample (adaLN linears act on the per-sample embedding: 1)."""
    if re.search(r"(^|\.)norm[^.]*\.linear$", path) or path.startswith("time_text_embed."):
        return 1
    if path.startswith("single_transformer_blocks."):
        return s_i + s_t
    if path.startswith("transformer_blocks."):
        ctx = any(k in path for k in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context",
                                      "norm1_context"))
        return s_t if ctx else s_i
    return s_i if "proj_out" in path or "x_embedder" in path else s_t if "context_embedder" in path else 1


def flux_train_flops(config, batch_layout, text_len: int, lora: Mapping[str, tuple[int, int, int, int]] = (),
                     out_tokens: int | None = None) -> float:
    """FLOPs of one LoRA train step (one optimizer update over the whole global batch; see module docstring).

    ``batch_layout``: a ``positions.BatchLayout`` (batch size and padded target + reference lengths) or a tuple
    ``(batch, target_len, reference_len)``; ``text_len``: T5 tokens; ``lora``: :func:`lora_dims` (norm layers'
    per-sample adapters counted once per sample)."""
    if isinstance(batch_layout, tuple):
        batch, t, r = batch_layout
    else:
        batch, t, r = batch_layout.ids.shape[0], batch_layout.target_len, batch_layout.reference_len
    s_i = t + r
    o = t if out_tokens is None else out_tokens  # the train step computes the target tokens' outputs only
    macs = flux_forward_macs(config, s_i, text_len, o)
    lora_macs = 0.0
    for path, (layers, din, dout, rank) in dict(lora).items():
        rows = layers * _lora_tokens(path, s_i, text_len)
        if path.startswith("single_transformer_blocks.") and not re.search(r"to_k|to_v|norm", path):
            rows -= s_i + text_len - o  # last single block: query / MLP / output rows of the o tokens only
        elif path == "proj_out":
            rows = o
        lora_macs += rows * rank * (din + dout)
    per_sample = macs["embed"] + 2 * macs["linear"] + 3 * macs["attention"] + 3 * lora_macs
    return 2.0 * batch * per_sample


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, device=None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None where the peak is unknown (CPU: report FLOP/s instead)."""
    peak = peak_flops(device)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * n_devices)
