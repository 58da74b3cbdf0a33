"""Kernel attentions under a mesh: splash (Pallas, interpret mode) inside shard_map on 8 fake CPU devices and the
cuDNN padding layout, against the ``xla`` implementation (values and gradients, padding masks, fewer queries than
keys), alone and inside the sharded train step; ``auto`` chosen from the target devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dreamomni2_jax.models.attention import attention, cudnn_attention, kernel_specs, resolve_impl


def _inputs(b=3, sq=90, s=200, h=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q, do = (rng.standard_normal((b, sq, h, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(2))
    mask = np.ones((b, s), bool)
    mask[1, 150:] = False  # padding at the end
    mask[2, 40:70] = False  # padding inside (a padded section followed by real tokens)
    mask[2, 180:] = False
    return q, k, v, do, mask


def _value_and_grads(impl_fn, q, k, v, do):
    f = lambda q, k, v: jnp.sum(impl_fn(q, k, v) * do)  # noqa: E731
    return impl_fn(q, k, v), jax.grad(f, argnums=(0, 1, 2))(q, k, v)


def test_cudnn_layout_real_keys_first_with_lengths_equals_masked_attention():
    """The cuDNN path's reordering (real keys first) + key lengths, run through XLA, equals the masked ``xla``."""
    q, k, v, do, mask = (jnp.asarray(x) for x in _inputs())
    want, want_g = _value_and_grads(lambda q, k, v: attention(q, k, v, mask, "xla"), q, k, v, do)
    got, got_g = _value_and_grads(lambda q, k, v: cudnn_attention(q, k, v, mask, implementation="xla"), q, k, v, do)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    assert float(jnp.abs(got_g[1][2, 40:70]).max()) == 0.0  # padded keys get no gradient


def test_auto_is_chosen_from_the_target_devices_not_the_host():
    dev = lambda platform, kind: SimpleNamespace(platform=platform, device_kind=kind)  # noqa: E731
    assert resolve_impl("auto", [dev("tpu", "TPU v5")]) == "splash"
    assert resolve_impl("auto", [dev("gpu", "NVIDIA H100 80GB HBM3")]) == "cudnn"
    assert resolve_impl("auto", [dev("gpu", "AMD Instinct MI300X")]) == "xla"
    assert resolve_impl("auto", [dev("cpu", "cpu")]) == "blocked"
    assert resolve_impl("xla", [dev("tpu", "TPU v5")]) == "xla"
    assert resolve_impl("auto") == "blocked"  # this host, no mesh in context
    with pytest.raises(ValueError, match="needs a TPU target"):
        attention(*(jnp.ones((1, 128, 1, 16)),) * 3, None, "splash")


def test_kernel_specs_shard_batch_then_heads():
    mesh = SimpleNamespace(axis_names=("data", "fsdp", "tensor"), shape={"data": 2, "fsdp": 2, "tensor": 2})
    assert kernel_specs(mesh, 8, 24) == (P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None))
    # sampler batch of 2 on fsdp=4: batch over data... no (size 1), fsdp does not divide 2 -> heads take fsdp
    mesh = SimpleNamespace(axis_names=("data", "fsdp", "tensor"), shape={"data": 1, "fsdp": 4, "tensor": 2})
    assert kernel_specs(mesh, 2, 24) == (P(None, None, ("tensor", "fsdp"), None), P(None, None))
    assert kernel_specs(mesh, 2, 3) == (P(None, None, None, None), P(None, None))


SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dreamomni2_jax import data, sharding as shd, train_step as ts
    from dreamomni2_jax.optimizers import make_optimizer
    from dreamomni2_jax.config import Config, LoraConfig, MeshConfig, ModelConfig, OptimConfig
    from dreamomni2_jax.lora import apply_lora_config
    from dreamomni2_jax.models.attention import attention
    from dreamomni2_jax.models.flux import FluxConfig, FluxTransformer2DModel
    from dreamomni2_jax.positions import SampleLayout as S
    from dreamomni2_jax.tiny import FLUX_TINY

    assert jax.device_count() == 8
    out = {}
    # 1. the dispatch alone: [B=4, Sq=90 | S=200, H=2] on (data 1, fsdp 4, tensor 2), padding masks
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
        return [np.asarray(o).tolist()] + [np.asarray(x).tolist() for x in g], text

    out["xla"], _ = run("xla")
    out["splash"], text = run("splash_interpret")
    out["splash_in_shard_map"] = "shard_map" in text or "manual_computation" in text

    # 2. the sharded train step (tiny Flux, padded multi-reference batch, target-only last block)
    cfg = Config(lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2),
                 mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    layouts = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
               S((2, 4), ((4, 4), (4, 4), (2, 2)))]
    batch = data.synthetic_batch(np.random.default_rng(0), layouts, channels=16, text_len=4, text_dim=32,
                               pooled_dim=32)
    smesh = shd.make_mesh(cfg.mesh)

    def step(impl):
        fc = FluxConfig.from_dict({**FLUX_TINY, "num_attention_heads": 2})
        build = lambda: FluxTransformer2DModel(fc, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32,
                                               attention_impl=impl)
        model = shd.init_sharded(build, smesh)
        apply_lora_config(model, cfg.lora, seed=1)
        tx = make_optimizer(cfg.optim, 10)
        graphdef, state = ts.init_train_state(model, tx, mesh=smesh)
        statics = ts.make_statics(graphdef, cfg, tx=tx, guidance_embeds=True, mesh=smesh)
        state, metrics = ts.compile_train_step(statics, state, batch)(state, shd.put_batch(batch, smesh),
                                                                       jax.random.key(0))
        return {"metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
                "mu": [np.asarray(x).tolist() for x in jax.tree.leaves(state.opt_state[0])]}

    out["step_xla"], out["step_splash"] = step("xla"), step("splash_interpret")
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_splash_in_shard_map_matches_xla_values_and_grads(sharded_results):
    r = sharded_results
    assert r["splash_in_shard_map"]
    for name, a, b in zip(("out", "dq", "dk", "dv"), r["splash"], r["xla"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=3e-5, rtol=1e-4, err_msg=name)


def test_sharded_train_step_with_splash_matches_xla(sharded_results):
    one, many = sharded_results["step_xla"], sharded_results["step_splash"]
    for k, v in one["metrics"].items():
        assert many["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for a, b in zip(one["mu"], many["mu"]):  # Adam first moments = (1 - b1) * gradient after one step
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
