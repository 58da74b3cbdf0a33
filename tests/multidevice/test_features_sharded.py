"""Issue-16 state on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 CPU devices: EMA and every optimizer's state
placed like the adapters, and a sharded step (muon + EMA + loss weights) equal to the single-device one."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from _sharded_setup import LAYOUTS, adapted_tiny_flux, tiny_batch, train_state
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.config import Config, LoraConfig, MeshConfig, OptimConfig, TrainConfig
from dreamomni2_jax.train.optimizers import NAMES

BASE = Config(lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2),
              mesh=MeshConfig(data=2, fsdp=2, tensor=2), train=TrainConfig(ema_decay=0.9, mask_floor=0.1))


def _cfg(name: str) -> Config:
    return dataclasses.replace(BASE, optim=dataclasses.replace(BASE.optim, name=name))


@pytest.mark.parametrize("name", NAMES)
def test_ema_and_optimizer_state_placed_like_adapters(name):
    mesh = shd.make_mesh(BASE.mesh)
    _, state = train_state(_cfg(name), adapted_tiny_flux(BASE.lora, mesh), mesh, ema=True)
    lora_sh = jax.tree.leaves(shd.shardings_of(state.lora))
    assert all(a == b for a, b in zip(jax.tree.leaves(shd.shardings_of(state.ema)), lora_sh, strict=True))
    assert any("fsdp" in str(s.spec) or "tensor" in str(s.spec) for s in lora_sh)  # adapters really are sharded
    target = jax.tree.structure(state.lora)
    subs = [sub for sub in jax.tree.leaves(state.opt_state, is_leaf=lambda x: jax.tree.structure(x) == target)
            if jax.tree.structure(sub) == target]
    assert subs, "no parameter-shaped part in the optimizer state"
    for sub in subs:  # every parameter-shaped subtree of the optimizer state carries the adapters' shardings
        for a, b, p in zip(jax.tree.leaves(sub), lora_sh, jax.tree.leaves(state.lora)):
            assert a.sharding == b if a.shape == p.shape else a.sharding.is_fully_replicated


def test_sharded_muon_ema_masked_step_matches_single_device():
    cfg = _cfg("muon")
    batch = tiny_batch(LAYOUTS * 2)
    batch["loss_weight"] = (np.random.default_rng(1).uniform(size=batch["img_mask"][:, :6].shape)
                            * batch["img_mask"][:, :6]).astype(np.float32)

    def run(mesh):
        statics, state = train_state(cfg, adapted_tiny_flux(cfg.lora, mesh), mesh, ema=True)
        step = ts.compile_train_step(statics, state, batch)
        b = batch if mesh is None else shd.put_batch(batch, mesh)
        for i in range(2):
            state, m = step(state, b, jax.random.key(i))
        return float(m["loss"]), [np.asarray(x) for x in jax.tree.leaves(state.ema) + jax.tree.leaves(state.opt_state)]

    (loss1, leaves1), (loss8, leaves8) = run(None), run(shd.make_mesh(cfg.mesh))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(leaves8, leaves1, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
