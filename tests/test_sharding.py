"""Mesh, sharding rules, multi-host detection (the sharded train step on 8 fake CPU devices: tests/multidevice/)."""
from __future__ import annotations

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
    """The launcher table itself is in tests/test_multihost.py; here the two names sharding keeps."""
    tpu = {"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "0"}
    assert shd.multihost_env({"TPU_SKIP_MDS_QUERY": "1"}) is None
    assert shd.multihost_env(tpu) == "tpu-gke"
    calls = []
    monkeypatch.setattr(shd.jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    assert not shd.initialize_distributed(MeshConfig(distributed="auto"), {"TPU_SKIP_MDS_QUERY": "1"})
    assert not shd.initialize_distributed(MeshConfig(distributed="off"), tpu)
    assert shd.initialize_distributed(MeshConfig(distributed="auto"), tpu)
    assert shd.initialize_distributed(MeshConfig(distributed="on"), {"TPU_SKIP_MDS_QUERY": "1"})
    assert len(calls) == 2
