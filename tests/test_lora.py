"""LoRA injection: targeting, zero-init identity, state helpers, dropout, and adapter gradients vs diffusers + peft."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dreamomni2_jax.lora import layers as L
from dreamomni2_jax.layout import ids_flux1 as P
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.config import LoraConfig
from dreamomni2_jax.models.schemas import lora_presets
from dreamomni2_jax.convert.loaders import load_flux
from dreamomni2_jax.data.stream import synthetic_batch
from dreamomni2_jax.train.step import StepConfig, StepStatics, loss_and_grads, sample_draws

ATTN_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]  # peft's spelling of the "attention" preset
LAYOUT = P.SampleLayout(target=(4, 6), references=((4, 4), (2, 6)))
TXT = 7


@pytest.fixture(scope="module")
def transformer_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir / "transformer"


@pytest.fixture(scope="module")
def base_state(transformer_dir):
    """Loaded once; tests clone it into fresh models."""
    return nnx.split(load_flux(transformer_dir, dtype=jnp.float32))


def _fresh(base_state):
    graphdef, state = base_state
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def _inputs(model, batch=2, seed=0):
    c = model.config
    return synthetic_batch(np.random.default_rng(seed), [LAYOUT] * batch, channels=c.in_channels, text_len=TXT,
                           text_dim=c.joint_attention_dim, pooled_dim=c.pooled_projection_dim)


def _forward(model, b):
    hidden = jnp.concatenate([b["target"], b["references"]], axis=1)
    return jax.jit(lambda g, s: nnx.merge(g, s)(hidden, b["text"], b["pooled"], jnp.full((hidden.shape[0],), 0.3),
                                                b["img_ids"], P.text_ids(TXT), guidance=1.0))(*nnx.split(model))


def test_targets_shapes_and_filter(base_state):
    model = _fresh(base_state)
    paths = tuple(attach_lora(model, config=LoraConfig(rank=4, alpha=8.0))["targets"])
    assert paths == ("single_transformer_blocks.attn.to_k", "single_transformer_blocks.attn.to_q",
                     "single_transformer_blocks.attn.to_v", "transformer_blocks.attn.to_k",
                     "transformer_blocks.attn.to_out.0", "transformer_blocks.attn.to_q", "transformer_blocks.attn.to_v")
    m = model.transformer_blocks.attn.to_out[0]
    assert isinstance(m, L.LoRALinear) and m.kernel.shape == (2, 32, 32)
    assert m.lora_A.shape == (2, 32, 4) and m.lora_B.shape == (2, 4, 32) and m.lora_scale == 2.0
    assert m.lora_A.dtype == jnp.float32 and not np.any(np.asarray(m.lora_B[...]))
    a = np.asarray(m.lora_A[...])
    assert not np.allclose(a[0], a[1])  # every layer has its own init
    _, lora, rest = nnx.split(model, L.LoRAParam, ...)
    assert len(jax.tree.leaves(lora)) == 2 * len(paths)
    assert not any(isinstance(v, L.LoRAParam) for _, v in nnx.to_flat_state(rest))
    assert isinstance(model.x_embedder, nnx.Linear) and not isinstance(model.x_embedder, L.LoRALinear)
    with pytest.raises(L.LoraError, match="already has LoRA"):
        attach_lora(model, config=LoraConfig())


def _peft_lora_a(init, din: int, rank: int, n: int) -> np.ndarray:
    """``n`` draws of peft's lora_A (as ``[in, r]``) for a ``Linear(din, din)`` with ``init_lora_weights=init``."""
    from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        lin = torch.nn.Module()
        lin.lin = torch.nn.Linear(din, din)
        lin = inject_adapter_in_model(PeftLoraConfig(r=rank, lora_alpha=rank, target_modules=["lin"],
                                                     init_lora_weights=init), lin)
        out.append(lin.lin.lora_A["default"].weight.detach().numpy().T)
    return np.stack(out)


@pytest.mark.parametrize("init,peft_init", [("gaussian", "gaussian"), ("kaiming", True)])
def test_lora_a_init_matches_peft(base_state, init, peft_init):
    """lora.init draws A like peft's init_lora_weights (the default gaussian is what diffusers' Kontext script and
    qflux pass); B starts at zero either way."""
    assert LoraConfig().init == "gaussian"
    model = _fresh(base_state)
    attach_lora(model, config=LoraConfig(rank=4, alpha=4.0, init=init), seed=3)
    m = model.transformer_blocks.attn.to_q  # kernel [2, 32, 32]
    ours = np.asarray(m.lora_A[...]).ravel()
    ref = _peft_lora_a(peft_init, 32, 4, 8).ravel()
    assert not np.any(np.asarray(m.lora_B[...]))
    assert np.std(ours) == pytest.approx(np.std(ref), rel=0.15)
    assert np.abs(ours).max() <= (1 / np.sqrt(32) if init == "kaiming" else 6 / 4)
    if init == "gaussian":
        assert np.std(ours) == pytest.approx(1 / 4, rel=0.15)  # N(0, 1/r²): ~4x Kaiming's 1/sqrt(3*32) here
    with pytest.raises(L.LoraError, match="not one of"):
        L.apply_lora(_fresh(base_state), [r"attn\.to_q"], rank=2, alpha=2.0, init="xavier")


def test_wide_preset_and_errors(base_state):
    model = _fresh(base_state)
    available = L.linear_paths(model)
    wide = L.apply_lora(model, lora_presets("flux")["kontext_wide"], rank=2, alpha=2.0)
    expected = [p for p in available if any(re.search(rx, p) for rx in lora_presets("flux")["kontext_wide"])]
    assert list(wide) == sorted(expected) and len(wide) == 16  # 12 per double block, 4 per single
    with pytest.raises(L.LoraError, match="available paths: .*x_embedder"):
        L.apply_lora(_fresh(base_state), [r"no_such_module"], rank=2, alpha=2.0)
    with pytest.raises(L.LoraError, match="invalid LoRA target regex"):
        L.apply_lora(_fresh(base_state), [r"attn.(to_q"], rank=2, alpha=2.0)
    with pytest.warns(UserWarning, match="matched nothing"):
        L.apply_lora(_fresh(base_state), [r"attn\.to_q", r"nothing_here"], rank=2, alpha=2.0)


def test_kontext_wide_preset_is_the_diffusers_kontext_script_default(base_state, transformer_dir):
    """peft with train_dreambooth_lora_flux_kontext.py's default target_modules adapts exactly our preset's modules."""
    from support import reference_code as ref
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig as PeftLoraConfig

    torch_model = FluxTransformer2DModel.from_pretrained(transformer_dir)
    torch_model.add_adapter(PeftLoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                           target_modules=ref.KONTEXT_SCRIPT_TARGET_MODULES))
    peft_paths = {re.sub(r"\.\d+\.", ".", n.rsplit(".lora_A", 1)[0], count=1)
                  for n, _ in torch_model.named_modules() if n.endswith(".lora_A")}
    ours = L.apply_lora(_fresh(base_state), lora_presets("flux")["kontext_wide"], rank=2, alpha=2.0)
    assert set(ours) == peft_paths and len(ours) == 16


def test_zero_init_is_identity_and_state_helpers(base_state):
    model = _fresh(base_state)
    b = _inputs(model)
    y0 = _forward(model, b)
    attach_lora(model, config=LoraConfig(rank=4, alpha=4.0))
    # B = 0 adds exact zeros; only XLA's fusion of the (different) program may reorder fp32 sums.
    np.testing.assert_allclose(np.asarray(_forward(model, b)), np.asarray(y0), rtol=1e-6, atol=1e-6)

    flat = L.lora_state(model)
    assert set(flat) == {f"{p}.lora_{x}" for p in L.lora_metadata(model)["targets"] for x in "AB"}
    meta = L.lora_metadata(model)
    assert meta["rank"] == 4 and meta["alpha"] == 4.0 and len(meta["targets"]) == 7
    rng = np.random.default_rng(1)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in flat.items()}
    L.set_lora_state(model, new)
    for k, v in L.lora_state(model).items():
        np.testing.assert_array_equal(np.asarray(v), new[k])
    assert np.abs(np.asarray(_forward(model, b)) - np.asarray(y0)).max() > 1e-3
    with pytest.raises(L.LoraError, match="missing keys .*to_q.lora_A"):
        L.set_lora_state(model, {k: v for k, v in new.items() if not k.endswith("attn.to_q.lora_A")})
    bad = dict(new)
    bad["transformer_blocks.attn.to_k.lora_B"] = np.zeros((3, 4, 32), np.float32)
    with pytest.raises(L.LoraError, match=r"to_k.lora_B.*\(3, 4, 32\)"):
        L.set_lora_state(model, bad)


def test_dropout_only_in_train_mode(base_state):
    model = _fresh(base_state)
    b = _inputs(model)
    attach_lora(model, config=LoraConfig(rank=4, alpha=4.0, dropout=0.5))
    L.set_lora_state(model, {k: jnp.full(v.shape, 0.1, v.dtype) for k, v in L.lora_state(model).items()})
    y_eval = _forward(model, b)
    graphdef, lora, rest = nnx.split(model, L.LoRAParam, ...)
    reseeded = L.reseed_dropout(rest, jax.random.key(0))
    keys = [np.asarray(v[...]) for _, v in nnx.to_flat_state(reseeded) if isinstance(v, L.LoRADropoutKey)]
    assert len(keys) == 7 and all(not np.array_equal(k[0], k[1]) for k in keys)  # per layer
    model = nnx.merge(graphdef, lora, reseeded)
    model.train()
    y_train = _forward(model, b)
    model.eval()
    np.testing.assert_array_equal(np.asarray(_forward(model, b)), np.asarray(y_eval))
    assert np.abs(np.asarray(y_train) - np.asarray(y_eval)).max() > 1e-4


def _peft_reference(transformer_dir, flat, rank, alpha):
    from diffusers import FluxTransformer2DModel as TorchFlux
    from peft import LoraConfig as PeftConfig, inject_adapter_in_model

    ref = TorchFlux.from_pretrained(transformer_dir, torch_dtype=torch.float32)
    ref = inject_adapter_in_model(PeftConfig(r=rank, lora_alpha=alpha, target_modules=ATTN_TARGETS), ref)
    ref.train()
    mods = {}
    for name, module in ref.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)", name)
            mods[(f"{m[1]}.{m[3]}", int(m[2]))] = module
    assert {k for k, _ in mods} == {k.rsplit(".", 1)[0] for k in flat}
    with torch.no_grad():
        for (path, i), module in mods.items():
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(flat[f"{path}.lora_A"][i]).T.copy()))
            module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(flat[f"{path}.lora_B"][i]).T.copy()))
    for p in ref.parameters():
        p.requires_grad_(False)
    for module in mods.values():
        module.lora_A["default"].weight.requires_grad_(True)
        module.lora_B["default"].weight.requires_grad_(True)
    return ref, mods


def test_adapter_grads_match_diffusers_peft(base_state, transformer_dir):
    rank, alpha = 4, 8.0
    model = _fresh(base_state)
    attach_lora(model, config=LoraConfig(rank=rank, alpha=alpha))
    rng = np.random.default_rng(3)
    L.set_lora_state(model, {k: (0.2 * rng.standard_normal(v.shape)).astype(np.float32)
                             for k, v in L.lora_state(model).items()})
    flat = L.lora_state(model)
    b = _inputs(model, seed=4)
    cfg = StepConfig(timestep_sampling="logit_normal", weighting="cosmap", guidance=3.5)
    graphdef, lora, frozen = nnx.split(model, L.LoRAParam, ...)
    statics = StepStatics(graphdef=graphdef, tx=None, lr_fn=None, cfg=cfg)
    key = jax.random.key(11)
    (loss, _), grads = jax.jit(lambda lo, fr, bb: loss_and_grads(lo, fr, bb, key, statics=statics))(lora, frozen, b)
    model_g = nnx.merge(graphdef, grads, frozen)
    ours = L.lora_state(model_g)

    t = b["target"].shape[1]
    draws = sample_draws(key, jnp.arange(2), t, b["target"].shape[2], jnp.full((2,), t), cfg)
    sigma, noise = (torch.from_numpy(np.asarray(draws[k])) for k in ("sigma", "noise"))
    ref, mods = _peft_reference(transformer_dir, flat, rank, alpha)
    x0 = torch.from_numpy(b["target"])
    s = sigma[:, None, None]
    hidden = torch.cat([(1 - s) * x0 + s * noise, torch.from_numpy(b["references"])], dim=1)
    pred = ref(hidden_states=hidden, encoder_hidden_states=torch.from_numpy(b["text"]),
               pooled_projections=torch.from_numpy(b["pooled"]), timestep=sigma,
               img_ids=torch.from_numpy(b["img_ids"][0]), txt_ids=torch.zeros(TXT, 3),
               guidance=torch.full((2,), 3.5), return_dict=False)[0][:, :t]
    weight = 2 / (np.pi * (1 - 2 * sigma + 2 * sigma ** 2))  # diffusers compute_loss_weighting_for_sd3 "cosmap"
    ref_loss = (weight[:, None, None] * (pred - (noise - x0)) ** 2).reshape(2, -1).mean(1).mean()
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), float(ref_loss.detach()), rtol=1e-4)
    worst = 0.0
    for (path, i), module in mods.items():
        for part in ("A", "B"):
            g_ref = getattr(module, f"lora_{part}")["default"].weight.grad.numpy().T
            g = np.asarray(ours[f"{path}.lora_{part}"][i])
            assert np.linalg.norm(g_ref) > 0
            worst = max(worst, np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref))
    print("worst relative adapter-grad error", worst)
    assert worst <= 1e-4, worst
