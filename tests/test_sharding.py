"""Mesh, sharding rules, multi-host detection, and the sharded train step on 8 fake CPU devices vs one device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from jax.sharding import PartitionSpec as P

from dreamomni2_jax import sharding as shd
from dreamomni2_jax.config import MeshConfig


def _fake_mesh(data=1, fsdp=1, tensor=1):
    return SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def test_mesh_shape():
    assert shd.mesh_shape(MeshConfig(), 8) == (1, 8, 1)
    assert shd.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert shd.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    with pytest.raises(shd.MeshError, match="not divisible by 3"):
        shd.mesh_shape(MeshConfig(fsdp=-1, tensor=3), 8)
    with pytest.raises(shd.MeshError, match="needs 4 devices, have 8"):
        shd.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_param_specs():
    mesh = _fake_mesh(fsdp=4, tensor=2)
    spec = lambda path, shape: shd.param_spec(path, shape, mesh)  # noqa: E731
    # heads over tensor, the other big dim over fsdp, the layer axis never sharded
    assert spec("transformer_blocks.attn.to_q.kernel", (19, 3072, 3072)) == P(None, "fsdp", "tensor")
    assert spec("transformer_blocks.attn.to_q.bias", (19, 3072)) == P(None, "tensor")
    assert spec("transformer_blocks.attn.to_out.0.kernel", (19, 3072, 3072)) == P(None, "tensor", "fsdp")
    assert spec("transformer_blocks.ff.net.0.proj.kernel", (19, 3072, 12288)) == P(None, "fsdp", "tensor")
    assert spec("transformer_blocks.ff_context.net.2.kernel", (19, 12288, 3072)) == P(None, "tensor", "fsdp")
    assert spec("single_transformer_blocks.proj_mlp.kernel", (38, 3072, 12288)) == P(None, "fsdp", "tensor")
    assert spec("single_transformer_blocks.proj_out.kernel", (38, 15360, 3072)) == P(None, "fsdp", None)
    assert spec("transformer_blocks.attn.norm_q.scale", (19, 128)) == P(None, "fsdp")
    assert spec("x_embedder.kernel", (64, 3072)) == P(None, "fsdp")
    assert spec("x_embedder.kernel", (64, 30)) == P("fsdp", None)  # largest divisible dim
    assert spec("proj_out.bias", (63,)) == P(None)  # nothing divisible: replicated
    # stacked layer axis is skipped even when it is the only divisible dim
    assert spec("single_transformer_blocks.attn.norm_k.scale", (8, 3)) == P(None, None)
    assert shd.param_spec("transformer_blocks.attn.to_q.kernel", (2, 32, 32), _fake_mesh()) == P(None, None, None)
    assert spec("transformer_blocks.attn.to_q.lora_dropout_key", (19, 4)) == P(None, None)
    # DoRA magnitude [L, out]: fsdp over the output features, like the adapters (by path and shape-only)
    assert spec("transformer_blocks.attn.to_q.lora_magnitude_vector", (19, 3072)) == P(None, "fsdp")
    assert spec("single_transformer_blocks.proj_out.lora_magnitude_vector", (38, 3072)) == P(None, "fsdp")
    assert shd.fsdp_spec((38, 3072), mesh) == P(None, "fsdp")  # the shape-only rule of the train state


def test_batch_size_checks():
    mesh = _fake_mesh(data=2, fsdp=2)
    shd.check_batch_size(8, mesh, 2)
    with pytest.raises(shd.MeshError, match="micro-batches of 3 samples.*data x fsdp = 4"):
        shd.check_batch_size(6, mesh, 2)


def test_multihost_detection(monkeypatch):
    assert shd.multihost_env({}) is None
    assert shd.multihost_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # single-host TPU VM
    assert shd.multihost_env({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == "tpu"
    assert shd.multihost_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == "slurm"
    assert shd.multihost_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert shd.multihost_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "jax"
    calls = []
    monkeypatch.setattr(shd.jax.distributed, "initialize", lambda *a, **k: calls.append(1))
    assert not shd.initialize_distributed(MeshConfig(distributed="auto"), {})
    assert not shd.initialize_distributed(MeshConfig(distributed="off"), {"TPU_WORKER_HOSTNAMES": "a,b"})
    assert shd.initialize_distributed(MeshConfig(distributed="auto"), {"TPU_WORKER_HOSTNAMES": "a,b"})
    assert shd.initialize_distributed(MeshConfig(distributed="on"), {})
    assert len(calls) == 2


SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dreamomni2_jax import sharding as shd, train_step as ts
    from dreamomni2_jax.config import Config, LoraConfig, MeshConfig, OptimConfig
    from dreamomni2_jax.lora import apply_lora_config
    from dreamomni2_jax.models.flux import FluxConfig, FluxTransformer2DModel
    from dreamomni2_jax.positions import SampleLayout as S
    from dreamomni2_jax.tiny import FLUX_TINY

    assert jax.device_count() == 8
    cfg = Config(lora=LoraConfig(rank=4, alpha=8.0), optim=OptimConfig(lr=1e-2, grad_accum=2),
                 mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    layouts = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
               S((2, 4), ((4, 4), (4, 4), (2, 2)))] * 2
    batch = ts.synthetic_batch(np.random.default_rng(0), layouts, channels=16, text_len=4, text_dim=32,
                               pooled_dim=32)

    def run(mesh):
        build = lambda: FluxTransformer2DModel(FluxConfig.from_dict(FLUX_TINY), rngs=nnx.Rngs(0),
                                               dtype=jnp.float32, param_dtype=jnp.float32)
        model = build() if mesh is None else shd.init_sharded(build, mesh)
        apply_lora_config(model, cfg.lora, seed=1)
        graphdef, state = ts.init_train_state(model, ts.make_optimizer(cfg.optim, 10), mesh=mesh)
        statics = ts.make_statics(graphdef, cfg, guidance_embeds=True, mesh=mesh)
        step = ts.compile_train_step(statics, state, batch)
        b = batch if mesh is None else shd.put_batch(batch, mesh)
        info = {}
        if mesh is not None:
            q = state.frozen["transformer_blocks"]["attn"]["to_q"]["kernel"][...]
            info["to_q_spec"] = str(q.sharding.spec)
            info["target_spec"] = str(b["target"].sharding.spec)
            info["lora_specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.lora)})
            before = q.addressable_shards[0].data.unsafe_buffer_pointer()
        for i in range(2):
            state, metrics = step(state, b, jax.random.key(i))
        if mesh is not None:
            q = state.frozen["transformer_blocks"]["attn"]["to_q"]["kernel"][...]
            info["frozen_not_copied"] = q.addressable_shards[0].data.unsafe_buffer_pointer() == before
        out = {"metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
               "mu": [np.asarray(x).tolist() for x in jax.tree.leaves(state.opt_state[0])],
               "lora": [np.asarray(x).tolist() for x in jax.tree.leaves(state.lora)]}
        return out, info

    single, _ = run(None)
    sharded, info = run(shd.make_mesh(cfg.mesh))
    print("RESULT" + json.dumps({"single": single, "sharded": sharded, "info": info}))
""")


def test_sharded_step_matches_single_device():
    import numpy as np

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    info = res["info"]
    assert info["to_q_spec"] == "P(None, 'fsdp', 'tensor')"
    assert info["target_spec"] == "P(('data', 'fsdp'), None, None)"
    assert "P(None, 'fsdp', None)" in info["lora_specs"]  # lora_A [L, in, r]: `in` over fsdp
    assert info["frozen_not_copied"]  # donated base weights pass through without a copy
    one, many = res["single"], res["sharded"]
    for k, v in one["metrics"].items():
        assert many["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for a, b in zip(one["mu"], many["mu"]):  # Adam first moments: the gradients' running mean
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    for a, b in zip(one["lora"], many["lora"]):  # adapters after 2 Adam updates (lr 1e-2)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
