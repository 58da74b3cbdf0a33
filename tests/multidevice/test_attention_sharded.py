"""The splash-attention kernel (interpret mode) under shard_map on 8 devices: same values and gradients as XLA
attention, alone and inside the sharded train step of the tiny Flux."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from _sharded_setup import LAYOUTS, adapted_tiny_flux, tiny_batch, train_state
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.config import Config, LoraConfig, MeshConfig, OptimConfig
from dreamomni2_jax.models.attention import attention


@pytest.fixture(scope="module")
def dispatch():
    """[B=4, Sq=90 | S=200, H=2] on (data 1, fsdp 4, tensor 2) with padding masks: outputs and grads per impl."""
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    rng = np.random.default_rng(0)
    q, do = (rng.standard_normal((4, 90, 2, 16)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((4, 200, 2, 16)).astype(np.float32) for _ in range(2))
    mask = np.ones((4, 200), bool)
    mask[1, 150:] = False
    mask[2, 40:70] = False
    mask[3, 100:] = False

    def run(impl):
        def loss(q, k, v):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                o = attention(q, k, v, jnp.asarray(mask), impl)
            return jnp.sum(o * do), o
        sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), in_shardings=(sh, sh, sh))
        text = f.lower(q, k, v).as_text()
        (_, o), g = f(q, k, v)
        return [np.asarray(o)] + [np.asarray(x) for x in g], text

    xla, _ = run("xla")
    splash, text = run("splash_interpret")
    return xla, splash, text


def test_splash_in_shard_map_matches_xla_values_and_grads(dispatch):
    xla, splash, text = dispatch
    assert "shard_map" in text or "manual_computation" in text
    for name, a, b in zip(("out", "dq", "dk", "dv"), splash, xla):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4, err_msg=name)


def test_sharded_train_step_with_splash_matches_xla():
    cfg = Config(lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2),
                 mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    batch, mesh = tiny_batch(LAYOUTS), shd.make_mesh(cfg.mesh)

    def step(impl):  # tiny Flux, padded multi-reference batch, target-only last block
        statics, state = train_state(cfg, adapted_tiny_flux(cfg.lora, mesh, attention_impl=impl), mesh)
        state, metrics = ts.compile_train_step(statics, state, batch)(state, shd.put_batch(batch, mesh),
                                                                       jax.random.key(0))
        return ({k: float(v) for k, v in jax.device_get(metrics).items()},
                [np.asarray(x) for x in jax.tree.leaves(state.opt_state[0])])

    (m_xla, mu_xla), (m_splash, mu_splash) = step("xla"), step("splash_interpret")
    for k, v in m_xla.items():
        assert m_splash[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for a, b in zip(mu_xla, mu_splash):  # Adam first moments = (1 - b1) * gradient after one step
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
