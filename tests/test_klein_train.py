"""The train step on FLUX.2 [klein] (tiny ``Flux2Transformer2DModel``): the loss is the flow-matching loss of the
diffusers model with the same inputs (4-axis ids, no guidance, no pooled text), and on a (data, fsdp, tensor) =
(2, 2, 2) mesh of 8 CPU devices with remat and 2 gradient-accumulation micro-batches it equals the single-device
step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dreamomni2_jax import train_step as ts
from dreamomni2_jax.positions import SampleLayout as S

TARGETS = (r"attn\.to_q$", r"attn\.to_v$", r"attn\.to_qkv_mlp_proj", r"attn\.to_out")
LAYOUTS = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
           S((2, 4), ((4, 4), (4, 4), (2, 2)))]


def test_klein_loss_is_the_diffusers_models_flow_matching_loss(tmp_path):
    """Our step's loss on a batch of 4 samples (1-3 references, padded) = the loss computed from the diffusers
    transformer (same weights) run per sample on its real tokens with the step's own σ / noise draws."""
    from dreamomni2_jax.loaders import load_flux2
    from dreamomni2_jax.tiny_klein import save_flux2_transformer
    from diffusers import Flux2Transformer2DModel

    src = save_flux2_transformer(tmp_path / "transformer", seed=3)
    model = load_flux2(src, dtype=jnp.float32)
    batch = ts.synthetic_batch(np.random.default_rng(0), LAYOUTS, channels=16, text_len=5, text_dim=96,
                               pooled_dim=0, scheme="flux2")
    assert batch["img_ids"].shape[-1] == 4 and batch["pooled"].shape == (4, 0)
    cfg = ts.StepConfig(guidance=None)
    rng = jax.random.key(5)
    idx = jnp.arange(4, dtype=jnp.int32)
    loss, _ = ts.flow_matching_loss(model, batch, rng, idx, cfg)
    t_len = batch["target"].shape[1]
    draws = ts.sample_draws(rng, idx, t_len, 16, jnp.asarray(batch["img_mask"][:, :t_len].sum(1), jnp.float32), cfg)
    ref = Flux2Transformer2DModel.from_pretrained(src).eval()
    from dreamomni2_jax.positions_flux2 import text_ids

    losses = []
    for i, lay in enumerate(LAYOUTS):
        t, r = lay.target_tokens, lay.reference_tokens
        x0, noise = batch["target"][i, :t], np.asarray(draws["noise"][i, :t])
        s = float(draws["sigma"][i])
        xt = (1 - s) * x0 + s * noise
        hid = np.concatenate([xt, batch["references"][i, :r]])[None]
        ids = np.concatenate([batch["img_ids"][i, :t], batch["img_ids"][i, t_len:t_len + r]])[None]
        with torch.no_grad():
            pred = ref(hidden_states=torch.from_numpy(hid.astype(np.float32)),
                       encoder_hidden_states=torch.from_numpy(batch["t5"][i:i + 1]),
                       timestep=torch.tensor([s], dtype=torch.float32), img_ids=torch.from_numpy(ids),
                       txt_ids=torch.from_numpy(text_ids(5)[None]), guidance=None, return_dict=False)[0].numpy()
        losses.append(np.mean((pred[0, :t] - (noise - x0)) ** 2))
    np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)


SCRIPT = r"""
import dataclasses, json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from dreamomni2_jax import sharding as shd, train_step as ts
from dreamomni2_jax.config import Config, LoraConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from dreamomni2_jax.lora import apply_lora_config
from dreamomni2_jax.models.flux2 import Flux2Config, Flux2Transformer2DModel
from dreamomni2_jax.positions import SampleLayout as S
from dreamomni2_jax.tiny_klein import FLUX2_TINY

assert jax.device_count() == 8
cfg = Config(model=ModelConfig(remat="full"), lora=LoraConfig(rank=4, alpha=8.0, preset="custom", targets=%(targets)r),
             optim=OptimConfig(lr=1e-2, grad_accum=2), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
             train=TrainConfig(ema_decay=0.9))
layouts = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
           S((2, 4), ((4, 4), (4, 4), (2, 2)))] * 2
batch = ts.synthetic_batch(np.random.default_rng(0), layouts, channels=16, text_len=4, text_dim=96, pooled_dim=0,
                           scheme="flux2")

def run(mesh, accum):
    c = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=accum))
    mk = lambda: Flux2Transformer2DModel(Flux2Config.from_dict(FLUX2_TINY), rngs=nnx.Rngs(0), dtype=jnp.float32,
                                         param_dtype=jnp.float32, remat="full" if mesh is not None else "none")
    model = mk() if mesh is None else shd.init_sharded(mk, mesh)
    apply_lora_config(model, c.lora, seed=1)
    graphdef, state = ts.init_train_state(model, ts.make_optimizer(c.optim, 10), mesh=mesh, ema=True)
    statics = ts.make_statics(graphdef, c, guidance_embeds=False, mesh=mesh)
    step = ts.compile_train_step(statics, state, batch)
    b = batch if mesh is None else shd.put_batch(batch, mesh)
    for i in range(2):
        state, m = step(state, b, jax.random.key(i))
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.lora)}) if mesh is not None else []
    return {"loss": float(m["loss"]), "lora": [np.asarray(x).tolist() for x in jax.tree.leaves(state.lora)],
            "specs": specs}

print("RESULT" + json.dumps({"single": run(None, 1), "sharded": run(shd.make_mesh(cfg.mesh), 2)}))
"""


def test_klein_step_sharded_remat_accum_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT % {"targets": TARGETS}], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[6:])
    single, sharded = out["single"], out["sharded"]
    assert np.isfinite(single["loss"])
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5)
    for a, b in zip(sharded["lora"], single["lora"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert any("fsdp" in s or "tensor" in s for s in sharded["specs"]), sharded["specs"]
