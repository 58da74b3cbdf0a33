"""Mesh, sharding rules, multi-host detection (the sharded train step on 8 fake CPU devices: tests/multidevice/)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from jax.sharding import PartitionSpec as P

from dreamomni2_jax import sharding as shd
from dreamomni2_jax.config import ConfigError, MeshConfig


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


# --------------------------------------------------------------------------- multi-slice (mesh.dcn_data)


class _FakeDevice:
    """What the mesh builders read of a device: id, platform, kind, process and slice."""

    def __init__(self, i, slice_index, per_slice):
        self.id, self.slice_index, self.process_index = i, slice_index, i // 4
        self.platform, self.device_kind = "cpu", "fake"
        self.local_index = i % per_slice

    def __repr__(self):
        return f"D{self.id}@s{self.slice_index}"


def _fake_devices(slices=2, per_slice=8, interleave=True):
    devs = [_FakeDevice(s * per_slice + j, s, per_slice) for s in range(slices) for j in range(per_slice)]
    return devs[::2] + devs[1::2] if interleave else devs  # the slices' devices mixed in the list


def test_dcn_data_builds_the_hybrid_mesh_one_slice_per_dcn_entry():
    grid, axes = shd.device_grid(MeshConfig(dcn_data=2, data=1, fsdp=-1, tensor=2), _fake_devices())
    assert axes == ("dcn_data", "data", "fsdp", "tensor") and grid.shape == (2, 1, 4, 2)
    for s in range(2):  # each dcn entry holds exactly one slice's devices, all 8 of them
        assert {d.slice_index for d in grid[s].flat} == {s} and len({d.id for d in grid[s].flat}) == 8
    grid, axes = shd.device_grid(MeshConfig(dcn_data=4, data=2, fsdp=1), _fake_devices(slices=4, per_slice=2))
    assert axes[0] == "dcn_data" and grid.shape == (4, 2, 1, 1)
    assert [{d.slice_index for d in grid[s].flat} for s in range(4)] == [{0}, {1}, {2}, {3}]


def test_dcn_data_1_is_the_single_mesh_and_mismatches_are_clear_errors():
    grid, axes = shd.device_grid(MeshConfig(), _fake_devices(interleave=False))
    assert axes == shd.AXES and grid.shape == (1, 16, 1)  # dcn_data=1: no dcn axis, as before
    with pytest.raises(shd.MeshError, match=r"mesh.dcn_data=2 needs 2 TPU slices .* 16 devices are in 4 slice"):
        shd.device_grid(MeshConfig(dcn_data=2), _fake_devices(slices=4, per_slice=4))
    no_slice = [SimpleNamespace(id=i, platform="gpu", device_kind="NVIDIA H100 80GB HBM3", process_index=i // 8)
                for i in range(16)]
    with pytest.raises(shd.MeshError, match=r"no slice_index.*GPU hosts .* mesh.data"):
        shd.device_grid(MeshConfig(dcn_data=2), no_slice)
    with pytest.raises(shd.MeshError, match="needs 16 devices, have 8"):  # sizes are per slice
        shd.device_grid(MeshConfig(dcn_data=2, data=2, fsdp=8), _fake_devices())
    with pytest.raises(ConfigError, match="dcn_data"):
        MeshConfig(dcn_data=0)._validate()


def test_batch_spans_dcn_data_and_params_never_do():
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((2, 1, 4, 2), ("dcn_data", "data", "fsdp", "tensor"))
    assert shd.batch_axes(mesh) == ("dcn_data", "data", "fsdp") and shd.batch_shards(mesh) == 8
    assert shd.batch_sharding(mesh, 3).spec == P(("dcn_data", "data", "fsdp"), None, None)
    with pytest.raises(shd.MeshError, match="dcn_data x data x fsdp = 8"):
        shd.check_batch_size(12, mesh)
    shd.check_batch_size(16, mesh, grad_accum=2)
    # parameters: per slice as on a one-slice mesh of the same data / fsdp / tensor sizes, nothing on dcn_data
    one = AbstractMesh((1, 4, 2), shd.AXES)
    for path, shape in [("transformer_blocks.attn.to_q.kernel", (19, 3072, 3072)), ("x_embedder.kernel", (64, 3072)),
                        ("single_transformer_blocks.proj_out.kernel", (38, 15360, 3072))]:
        spec = shd.param_spec(path, shape, mesh)
        assert spec == shd.param_spec(path, shape, one) and "dcn_data" not in str(spec)
    assert shd.shape_sharding(mesh, (16, 3072)).spec == P(None, "fsdp")
    assert shd.batch_axes(one) == shd.BATCH_AXES and shd.batch_sharding(one, 2).spec == P(("data", "fsdp"), None)


def test_attention_kernel_splits_the_batch_over_dcn_data_too():
    from dreamomni2_jax.models.attention import kernel_specs

    mesh = SimpleNamespace(axis_names=("dcn_data", "data", "fsdp", "tensor"),
                           shape={"dcn_data": 2, "data": 1, "fsdp": 4, "tensor": 2})
    assert kernel_specs(mesh, 8, 24) == (P(("dcn_data", "data", "fsdp"), None, "tensor", None),
                                         P(("dcn_data", "data", "fsdp"), None))
