"""Kernel attentions: the cuDNN padding layout against the ``xla`` implementation (values and gradients, padding
masks, fewer queries than keys), kernel shardings, ``auto`` chosen from the target devices. Splash inside
shard_map on 8 fake CPU devices, alone and in the sharded train step: tests/multidevice/."""
from __future__ import annotations

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
