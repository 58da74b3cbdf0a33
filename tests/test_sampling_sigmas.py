"""FlowMatch Euler schedule vs diffusers' FlowMatchEulerDiscreteScheduler (the tiny fixture's scheduler config)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift as ref_calculate_shift

from dreamomni2_jax.sample import schedule as S


@pytest.fixture(scope="module")
def sched_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir / "scheduler"


def _reference(sched_dir, steps, seq_len, **overrides):
    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(sched_dir, **overrides)
    c = ref.config
    mu = ref_calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return ref, mu


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 6000])
def test_dynamic_shift_schedule_matches_diffusers(sched_dir, steps, seq_len):
    ref, mu = _reference(sched_dir, steps, seq_len)
    cfg = S.FlowMatchConfig.from_json(sched_dir / "scheduler_config.json")
    assert cfg.use_dynamic_shifting
    c = ref.config
    assert S.calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift) == \
        pytest.approx(mu, abs=1e-12)
    timesteps, sigmas = S.set_timesteps(cfg, steps, image_seq_len=seq_len)
    assert timesteps.dtype == np.float32 and sigmas.dtype == np.float32
    assert sigmas.shape == (steps + 1,)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps / 1000, ref.timesteps.numpy() / 1000, rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(use_dynamic_shifting=False, shift=3.0),
                                       dict(time_shift_type="linear"), dict(shift_terminal=0.1)])
def test_other_config_options_match_diffusers(sched_dir, tmp_path, overrides):
    ref, _ = _reference(sched_dir, 10, 777, **overrides)
    d = json.loads((sched_dir / "scheduler_config.json").read_text())
    cfg = S.FlowMatchConfig.from_dict({**d, **overrides})
    timesteps, sigmas = S.set_timesteps(cfg, 10, image_seq_len=777)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps / 1000, ref.timesteps.numpy() / 1000, rtol=0, atol=1e-6)


def test_euler_steps_match_diffusers(sched_dir):
    steps, seq_len = 5, 300
    ref, _ = _reference(sched_dir, steps, seq_len)
    cfg = S.FlowMatchConfig.from_json(sched_dir / "scheduler_config.json")
    _, sigmas = S.set_timesteps(cfg, steps, image_seq_len=seq_len)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 16)).astype(np.float32)
    ours = x.copy()
    theirs = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        theirs = ref.step(torch.from_numpy(v), t, theirs, return_dict=False)[0]
        ours = np.asarray(S.euler_step(ours, v, sigmas[i], sigmas[i + 1]))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-6)


def test_bad_configs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        S.FlowMatchConfig.from_dict({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="not supported"):
        S.FlowMatchConfig.from_dict({"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(FileNotFoundError, match="scheduler config missing"):
        S.FlowMatchConfig.from_json(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="steps"):
        S.set_timesteps(S.FlowMatchConfig(), 0, image_seq_len=10)
