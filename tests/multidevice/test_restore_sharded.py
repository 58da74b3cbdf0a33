"""Streaming restore of a converted (bf16) and a diffusers (on-the-fly) Flux transformer straight into the shardings
``param_sharding`` asks for on 8 devices: every parameter placed as requested, values as on one device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from dreamomni2_jax.convert import flux_transformer as fc
from dreamomni2_jax.convert.loaders import load_flux


def _flat(model) -> dict:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def transformer_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir / "transformer"


@pytest.mark.parametrize("source", ["converted_bf16", "diffusers"])
def test_restore_sharded_on_8_devices(transformer_dir, tmp_path, source):
    path = fc.convert(transformer_dir, tmp_path / "flux", dtype="bf16", progress=False) \
        if source == "converted_bf16" else transformer_dir
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    requested = {}

    def param_sharding(name, shape):  # the largest dimension divisible by 8 over fsdp
        dims = [i for i, d in enumerate(shape) if d % 8 == 0]
        spec = [None] * len(shape)
        if dims:
            spec[max(dims, key=lambda i: shape[i])] = "fsdp"
        requested[name] = tuple(spec)
        return NamedSharding(mesh, PS(*spec))

    flat = _flat(load_flux(path, dtype=jnp.float32, mesh=mesh, param_sharding=param_sharding))
    direct = {k: np.asarray(v) for k, v in _flat(load_flux(transformer_dir, dtype=jnp.float32)).items()}
    assert flat.keys() == direct.keys()
    mismatch = [k for k, v in flat.items()
                if tuple(v.sharding.spec) + (None,) * (v.ndim - len(v.sharding.spec)) != requested[k]]
    assert mismatch == []
    assert sum(any(s is not None for s in requested[k]) for k in flat) > len(direct) // 2
    for k, v in direct.items():  # bf16 output is rounded, except the (float32) norm scales
        want = v if source == "diffusers" or k.endswith(".scale") else \
            v.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(flat[k]), want, err_msg=k)
