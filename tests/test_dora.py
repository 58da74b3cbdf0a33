"""DoRA (``lora.variant = "dora"``) against peft's DoRA Linear and diffusers' LoRA loader on the tiny model: layer
forward and gradients, training (loss goes down, EMA, exact resume, checkpoint export), file export/import."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from support.asserts import assert_adapter_close, assert_close
from dreamomni2_jax.checkpoint import store as C
from dreamomni2_jax.lora import files as L
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.config import LoraConfig
from dreamomni2_jax.convert.flux_transformer import main as convert_main
from dreamomni2_jax.tools.export_lora import main as export_main
from dreamomni2_jax.convert.loaders import load_flux
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.train.optimizers import make_optimizer
from dreamomni2_jax.testing.tiny_flux1 import flux_model
from dreamomni2_jax.lora.layers import (LoRALinear, apply_lora, lora_metadata, lora_modules, lora_state,
    set_lora_state)
from test_lora_io import _jax_out, _torch_out, inputs  # noqa: F401 - inputs: the same fixture on this base_model
from test_train_step import CFG, LORA, _copy, batch

MAG = "lora_magnitude_vector"


def _peft_dora_linear(din, dout, rank, alpha, dropout, seed=0):
    """peft's LoRA Linear with ``use_dora=True`` on a random ``nn.Linear``, with random B and magnitude."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(din, dout))
    inject_adapter_in_model(PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], use_dora=True,
                                           lora_dropout=dropout, init_lora_weights="gaussian"), net)
    layer = net.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.5)
        layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.3 * torch.rand(dout))
    return layer


class _FixedMask(torch.nn.Module):
    """Dropout with a given keep mask (ours), so peft's dropped path sees the same dropout as our layer."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return torch.where(self.keep, x / (1.0 - self.p), torch.zeros_like(x))


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["eval", "dropout"])
def test_dora_linear_matches_peft_forward_and_gradients(dropout):
    din, dout, rank, alpha = 12, 10, 4, 6.0
    ref = _peft_dora_linear(din, dout, rank, alpha, dropout)
    w, bias = ref.base_layer.weight.detach().numpy(), ref.base_layer.bias.detach().numpy()
    a, b = ref.lora_A["default"].weight.detach().numpy(), ref.lora_B["default"].weight.detach().numpy()
    m = ref.lora_magnitude_vector["default"].weight.detach().numpy()

    base = nnx.Linear(din, dout, rngs=nnx.Rngs(0))
    base.kernel[...], base.bias[...] = jnp.asarray(w.T), jnp.asarray(bias)
    ours = LoRALinear(base, rank=rank, alpha=alpha, key=jax.random.key(0), dropout=dropout, variant="dora")
    ours.lora_A[...], ours.lora_B[...], ours.lora_magnitude_vector[...] = a.T, b.T, m
    x = np.random.default_rng(1).standard_normal((3, 5, din)).astype(np.float32)
    g = np.random.default_rng(2).standard_normal((3, 5, dout)).astype(np.float32)
    if dropout:
        ours.deterministic = False
        ours.lora_dropout_key[...] = jax.random.key_data(jax.random.key(7))
        keep = np.array(jax.random.bernoulli(jax.random.key(7), 1.0 - dropout, x.shape))
        ref.lora_dropout["default"] = _FixedMask(torch.from_numpy(keep), dropout)
        ref.train()
    else:
        ref.eval()

    xt = torch.from_numpy(x)
    want = ref(xt)
    (want * torch.from_numpy(g)).sum().backward()
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def objective(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(jnp.asarray(x)) * g)

    got = np.asarray(nnx.merge(graphdef, params, rest)(jnp.asarray(x)))
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)
    grads = jax.grad(objective)(params)
    for name, torch_grad in (("lora_A", ref.lora_A["default"].weight.grad.T),
                             ("lora_B", ref.lora_B["default"].weight.grad.T),
                             (MAG, ref.lora_magnitude_vector["default"].weight.grad)):
        np.testing.assert_allclose(np.asarray(grads[name][...]), torch_grad.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    # a fresh DoRA adapter (B = 0, m = ||W||) leaves the layer unchanged, as peft's
    fresh = LoRALinear(nnx.clone(base), rank=rank, alpha=alpha, key=jax.random.key(0), variant="dora")
    np.testing.assert_allclose(np.asarray(fresh.lora_magnitude_vector[...]), np.linalg.norm(w, axis=1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(x))), np.asarray(base(jnp.asarray(x))), rtol=1e-5,
                               atol=1e-6)


# --------------------------------------------------------------------------- training


def test_dora_train_step_trains_with_ema_and_resumes_exactly(tmp_path):
    """Tiny model with DoRA adapters: the loss goes down, the magnitudes train and are averaged (EMA), a resume
    through an Orbax checkpoint is bitwise the straight run, and the checkpoint exports a DoRA file."""
    lora_cfg = dataclasses.replace(LORA, variant="dora")
    cfg = dataclasses.replace(CFG, lora=lora_cfg, train=dataclasses.replace(CFG.train, ema_decay=0.9))
    model = flux_model(0)
    attach_lora(model, config=lora_cfg, seed=0)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, state0 = ts.init_train_state(model, tx, ema=True)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state0.lora)[0]]
    n_mod = len(lora_modules(model))
    assert sum(MAG in p for p in paths) == n_mod and len(paths) == 3 * n_mod  # A, B and a magnitude per module
    statics = ts.make_statics(graphdef, cfg, tx=tx, guidance_embeds=True)
    b = batch(seed=2)
    step = ts.compile_train_step(statics, state0, b)
    keys = [jax.random.key(3)] * 10
    state, losses = _copy(state0), []
    for k in keys:
        state, m = step(state, b, k)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    mags = lambda s: [np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(s)[0]  # noqa: E731
                      if MAG in jax.tree_util.keystr(p)]
    for m0, m1, e1 in zip(mags(state0.lora), mags(state.lora), mags(state.ema)):
        assert not np.allclose(m0, m1) and not np.allclose(e1, m1) and not np.allclose(e1, m0)

    half = _copy(state0)
    for k in keys[:5]:
        half, _ = step(half, b, k)
    with C.open_run(tmp_path, cfg, async_save=False) as ck:
        ck.save(5, half.trainable(), None, None, force=True)
    with C.open_run(tmp_path, cfg, async_save=False) as ck:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state0.trainable())
        restored, _, _, at = ck.restore(5, abstract)
    resumed = _copy(state0).replace_trainable(restored)
    for k in keys[5:]:
        resumed, _ = step(resumed, b, k)
    for x, y in zip(jax.tree.leaves(resumed.trainable()), jax.tree.leaves(state.trainable())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    flat, meta = C.load_lora(tmp_path)
    assert meta["variant"] == "dora" and sorted(k for k in flat if k.endswith(MAG)) == [
        f"{p}.{MAG}" for p in sorted(lora_modules(model))]
    out = tmp_path / "dora.safetensors"
    assert export_main(["--ckpt", str(tmp_path), "--out", str(out), "--dtype", "fp32"]) == 0
    with safe_open(str(out), "np") as f:
        np.testing.assert_array_equal(f.get_tensor(f"transformer.proj_out.{MAG}"), flat[f"proj_out.{MAG}"])
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.use_dora"] is True
    assert export_main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "k.safetensors"), "--format", "kohya"]) == 2


# --------------------------------------------------------------------------- files vs diffusers + peft

TARGETS = [r"attn\.to_q", r"attn\.to_v", r"attn\.to_out\.0", r"attn\.add_k_proj", r"proj_mlp", r"norm_out\.linear",
           r"single_transformer_blocks\.proj_out", r"ff\.net\.2", r"x_embedder"]


@pytest.fixture(scope="module")
def base_model(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora") / "flux32"
    assert convert_main(["--src", str(tiny_pipeline_dir / "transformer"), "--out", str(out), "--dtype", "fp32",
                         "--no-progress"]) == 0
    return load_flux(out, dtype=jnp.float32)


def _dora_model(base_model, alpha=6.0, rank=4, seed=1):
    model = nnx.clone(base_model)
    apply_lora(model, TARGETS, rank=rank, alpha=alpha, seed=seed, variant="dora")
    rng = np.random.default_rng(seed)
    flat = {k: np.asarray(v) * (1 + 0.2 * rng.uniform(size=v.shape).astype(np.float32)) if k.endswith(MAG)
            else np.asarray(v) + (0.3 * rng.standard_normal(v.shape).astype(np.float32) if k.endswith("lora_B") else 0)
            for k, v in lora_state(model).items()}
    set_lora_state(model, flat)
    return model


def test_dora_export_loads_in_diffusers_with_equal_output_and_reads_back(base_model, inputs, tiny_pipeline_dir,
                                                                         tmp_path):
    from diffusers import FluxKontextPipeline

    model = _dora_model(base_model)
    path = L.save_lora_file(tmp_path / "pytorch_lora_weights.safetensors", lora_state(model), 6.0)
    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert f.get_tensor(f"transformer.transformer_blocks.1.attn.to_q.{MAG}").shape == (32,)
        assert f.get_tensor(f"transformer.norm_out.linear.{MAG}").shape == (64,)
    assert meta["transformer.use_dora"] is True and meta["transformer.lora_alpha"] == 6.0
    ours = _jax_out(model, inputs)

    pipe = FluxKontextPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)
    base = _torch_out(pipe.transformer, inputs)
    pipe.load_lora_weights(str(path), adapter_name="d")
    dora_layers = [m for m in pipe.transformer.modules() if getattr(m, "lora_magnitude_vector", None)]
    assert len(dora_layers) == len(L.unstack(lora_state(model), 6.0))  # every module loaded as peft DoRA
    assert_adapter_close(ours, _torch_out(pipe.transformer, inputs), 1e-4, base)

    # import back: the same DoRA adapters, the same output; a plain LoRA model cannot take them
    back = nnx.clone(base_model)
    info = attach_lora(back, path)
    assert info["variant"] == "dora" and lora_metadata(back)["variant"] == "dora"
    for k, v in lora_state(model).items():
        np.testing.assert_array_equal(np.asarray(lora_state(back)[k]), np.asarray(v))
    assert_close(_jax_out(back, inputs), ours, 1e-4)
    plain = nnx.clone(base_model)
    apply_lora(plain, TARGETS, rank=4, alpha=6.0)
    with pytest.raises(L.LoraFileError, match="dora adapter cannot be loaded into the model's lora adapters"):
        attach_lora(plain, path)
    with pytest.raises(L.LoraFileError, match="kohya/ComfyUI export of DoRA"):
        L.save_lora_file(tmp_path / "k.safetensors", lora_state(model), 6.0, format="kohya")


def test_dora_init_from_plain_lora_file_keeps_its_output(base_model, inputs, tmp_path):
    """``lora.variant=dora`` with ``lora.init_from`` a plain LoRA: magnitudes start at ``||W + s A B||``, so the
    model computes what the LoRA computes (peft's DoRA init from a LoRA)."""
    src = nnx.clone(base_model)
    apply_lora(src, TARGETS, rank=4, alpha=4.0, seed=3)
    rng = np.random.default_rng(3)
    set_lora_state(src, {k: np.asarray(v) + (0.3 * rng.standard_normal(v.shape).astype(np.float32)
                                             if k.endswith("lora_B") else 0) for k, v in lora_state(src).items()})
    path = L.save_lora_file(tmp_path / "plain.safetensors", lora_state(src), 4.0)
    model = nnx.clone(base_model)
    attach_lora(model, config=LoraConfig(variant="dora", init_from=str(path)))
    assert lora_metadata(model)["variant"] == "dora"
    assert_adapter_close(_jax_out(model, inputs), _jax_out(src, inputs), 1e-4,
                         _jax_out(base_model, inputs))


def test_import_dora_saved_by_diffusers_from_peft(base_model, inputs, tiny_pipeline_dir, tmp_path):
    """A DoRA LoRA trained in PyTorch (peft ``use_dora=True``, written by diffusers' ``save_lora_weights``) loads into
    the JAX model as DoRA with peft's output."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    ref = FluxTransformer2DModel.from_pretrained(tiny_pipeline_dir / "transformer", torch_dtype=torch.float32)
    base = _torch_out(ref, inputs)
    ref.add_adapter(PeftLoraConfig(r=3, lora_alpha=5, target_modules=["to_q", "to_v", "proj_out", "ff.net.0.proj"],
                                   init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if MAG in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    FluxKontextPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                          transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    want = _torch_out(ref, inputs)
    model = nnx.clone(base_model)
    meta = attach_lora(model, tmp_path / "pytorch_lora_weights.safetensors")
    assert meta["variant"] == "dora" and meta["rank"] == 3 and meta["alpha"] == 5.0
    assert lora_metadata(model)["variant"] == "dora"
    assert_adapter_close(_jax_out(model, inputs), want, 1e-4, base)
