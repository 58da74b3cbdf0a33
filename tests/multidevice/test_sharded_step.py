"""The train step on a (data 2, fsdp 2, tensor 2) mesh equals the single-device step (grad accumulation 2)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from _sharded_setup import LAYOUTS, adapted_tiny_flux, tiny_batch, train_state
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.config import Config, LoraConfig, MeshConfig, OptimConfig

CFG = Config(lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2, grad_accum=2),
             mesh=MeshConfig(data=2, fsdp=2, tensor=2))


def _run(batch, mesh):
    statics, state = train_state(CFG, adapted_tiny_flux(CFG.lora, mesh), mesh)
    step = ts.compile_train_step(statics, state, batch)
    b = batch if mesh is None else shd.put_batch(batch, mesh)
    info = {}
    if mesh is not None:
        q = state.frozen["transformer_blocks"]["attn"]["to_q"]["kernel"][...]
        info["to_q_spec"] = q.sharding.spec
        info["target_spec"] = b["target"].sharding.spec
        info["lora_specs"] = {x.sharding.spec for x in jax.tree.leaves(state.lora)}
        before = q.addressable_shards[0].data.unsafe_buffer_pointer()
    for i in range(2):
        state, metrics = step(state, b, jax.random.key(i))
    if mesh is not None:
        q = state.frozen["transformer_blocks"]["attn"]["to_q"]["kernel"][...]
        info["frozen_not_copied"] = q.addressable_shards[0].data.unsafe_buffer_pointer() == before
    out = {"metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
           "mu": [np.asarray(x) for x in jax.tree.leaves(state.opt_state[0])],
           "lora": [np.asarray(x) for x in jax.tree.leaves(state.lora)]}
    return out, info


def test_sharded_step_matches_single_device():
    batch = tiny_batch(LAYOUTS * 2)
    one, _ = _run(batch, None)
    many, info = _run(batch, shd.make_mesh(CFG.mesh))
    assert info["to_q_spec"] == P(None, "fsdp", "tensor")
    assert info["target_spec"] == P(("data", "fsdp"), None, None)
    assert P(None, "fsdp", None) in info["lora_specs"]  # lora_A [L, in, r]: `in` over fsdp
    assert info["frozen_not_copied"]  # donated base weights pass through without a copy
    for k, v in one["metrics"].items():
        assert many["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for a, b in zip(one["mu"], many["mu"]):  # Adam first moments: the gradients' running mean
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    for a, b in zip(one["lora"], many["lora"]):  # adapters after 2 Adam updates (lr 1e-2)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
