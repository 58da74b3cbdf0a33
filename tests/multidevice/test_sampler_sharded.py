"""Sampling with an FSDP-sharded, LoRA-patched transformer (what the training loop passes to validation) gives the
images of the single-device model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamomni2_jax.sample import pipeline as sampler
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.config import MeshConfig


def test_sampling_with_a_model_sharded_over_8_devices(tiny_converted_dir, peft_lora_file):
    pipe = sampler.load_pipeline(tiny_converted_dir, jnp.float32, max_sequence_length=16)
    model = nnx.clone(pipe.transformer)
    attach_lora(model, peft_lora_file)
    graphdef, state = nnx.split(nnx.clone(model))
    mesh = shd.make_mesh(MeshConfig())
    sharded = nnx.merge(graphdef, jax.device_put(state, shd.model_state_shardings(state, mesh)))
    leaves = jax.tree.leaves(nnx.state(sharded))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in leaves)
    kw = dict(height=32, width=32, steps=2, seeds=[0, 1], max_area=None, progress=False)
    a = pipe("a photo of a cat", None, transformer=sharded, **kw)
    b = pipe("a photo of a cat", None, transformer=model, **kw)
    np.testing.assert_allclose(a, b, atol=1e-5)
