"""Issue-16 state on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 CPU devices: EMA and every optimizer's state
placed like the adapters, and a sharded step (muon + EMA + loss weights) equal to the single-device one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import dataclasses, json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from dreamomni2_jax import data, sharding as shd, train_step as ts
from dreamomni2_jax.optimizers import make_optimizer
from dreamomni2_jax.config import Config, LoraConfig, MeshConfig, OptimConfig, TrainConfig
from dreamomni2_jax.lora import apply_lora_config
from dreamomni2_jax.models.flux import FluxConfig, FluxTransformer2DModel
from dreamomni2_jax.positions import SampleLayout as S
from dreamomni2_jax.tiny import FLUX_TINY

assert jax.device_count() == 8
base = Config(lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2),
              mesh=MeshConfig(data=2, fsdp=2, tensor=2), train=TrainConfig(ema_decay=0.9, mask_floor=0.1))
mesh = shd.make_mesh(base.mesh)
layouts = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
           S((2, 4), ((4, 4), (4, 4), (2, 2)))] * 2
batch = data.synthetic_batch(np.random.default_rng(0), layouts, channels=16, text_len=4, text_dim=32, pooled_dim=32)
batch["loss_weight"] = (np.random.default_rng(1).uniform(size=batch["img_mask"][:, :6].shape)
                        * batch["img_mask"][:, :6]).astype(np.float32)

def build(mesh):
    mk = lambda: FluxTransformer2DModel(FluxConfig.from_dict(FLUX_TINY), rngs=nnx.Rngs(0), dtype=jnp.float32,
                                        param_dtype=jnp.float32)
    model = mk() if mesh is None else shd.init_sharded(mk, mesh)
    apply_lora_config(model, base.lora, seed=1)
    return model

placement = {}
for name in ("adamw", "prodigy", "schedule_free_adamw", "muon", "adafactor"):
    cfg = dataclasses.replace(base, optim=dataclasses.replace(base.optim, name=name))
    _, state = ts.init_train_state(build(mesh), make_optimizer(cfg.optim, 10), mesh=mesh, ema=True)
    lora_sh = jax.tree.leaves(shd.shardings_of(state.lora))
    ema_ok = [a == b for a, b in zip(jax.tree.leaves(shd.shardings_of(state.ema)), lora_sh)]
    target = jax.tree.structure(state.lora)
    like = []  # every parameter-shaped subtree of the optimizer state carries the adapters' shardings
    for sub in jax.tree.leaves(state.opt_state, is_leaf=lambda x: jax.tree.structure(x) == target):
        if jax.tree.structure(sub) == target:
            like.append(all(a.sharding == b if a.shape == p.shape else a.sharding.is_fully_replicated
                            for a, b, p in zip(jax.tree.leaves(sub), lora_sh, jax.tree.leaves(state.lora))))
    placement[name] = {"ema": all(ema_ok), "like": like, "same_shape": sum(
        a.shape == p.shape for sub in jax.tree.leaves(state.opt_state, is_leaf=lambda x: jax.tree.structure(x) == target)
        if jax.tree.structure(sub) == target for a, p in zip(jax.tree.leaves(sub), jax.tree.leaves(state.lora))),
                       "lora_specs": sorted({str(s.spec) for s in lora_sh})}

def run(mesh):
    cfg = dataclasses.replace(base, optim=dataclasses.replace(base.optim, name="muon"))
    tx = make_optimizer(cfg.optim, 10)
    graphdef, state = ts.init_train_state(build(mesh), tx, mesh=mesh, ema=True)
    statics = ts.make_statics(graphdef, cfg, tx=tx, guidance_embeds=True, mesh=mesh)
    step = ts.compile_train_step(statics, state, batch)
    b = batch if mesh is None else shd.put_batch(batch, mesh)
    for i in range(2):
        state, m = step(state, b, jax.random.key(i))
    return {"loss": float(m["loss"]), "ema": [np.asarray(x).tolist() for x in jax.tree.leaves(state.ema)],
            "mu": [np.asarray(x).tolist() for x in jax.tree.leaves(state.opt_state)]}

print("RESULT" + json.dumps({"placement": placement, "single": run(None), "sharded": run(mesh)}))
"""


def test_feature_state_sharded_and_step_matches_single_device():
    import numpy as np

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[6:])
    for name, p in out["placement"].items():
        assert p["ema"] and p["like"] and all(p["like"]), (name, p)
        assert any("fsdp" in s or "tensor" in s for s in p["lora_specs"]), p  # adapters really are sharded
    single, sharded = out["single"], out["sharded"]
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5)
    for a, b in zip(sharded["ema"] + sharded["mu"], single["ema"] + single["mu"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
