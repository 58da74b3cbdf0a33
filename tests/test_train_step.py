"""Flow-matching LoRA train step: gradient accumulation, padding masks, multi-reference batches, overfitting,
non-finite skipping, σ samplers / weightings vs diffusers, FLOPs formula vs the traced program, the loop."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from support.asserts import assert_trees_close
from dreamomni2_jax.data import stream as data
from dreamomni2_jax.train import loop, optimizers, flops as perf, sigmas as train_sigmas
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.config import Config, DataConfig, LoraConfig, OptimConfig, TrainConfig
from dreamomni2_jax.lora.attach import attach_lora
from dreamomni2_jax.layout.ids_flux1 import SampleLayout as S
from dreamomni2_jax.testing.tiny_flux1 import flux_model

# Attention adapters plus the output head, so the tiny random model can actually fit a batch.
LORA = LoraConfig(rank=8, alpha=8.0, targets=(r"norm_out\.linear", r"^proj_out"))
# 1, 2 and 3 references of mixed sizes: target and reference sections both padded.
LAYOUTS = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
           S((2, 4), ((4, 4), (4, 4), (2, 2)))]
CFG = Config(lora=LORA, optim=OptimConfig(lr=3e-2, weight_decay=0.0, grad_clip=1.0),
             train=TrainConfig(steps=1000, timestep_sampling="logit_normal", weighting="none"))


def tiny_model(seed=0):
    model = flux_model(seed)
    attach_lora(model, config=LORA, seed=seed)
    return model


def batch(seed=0, layouts=LAYOUTS):
    return data.synthetic_batch(np.random.default_rng(seed), layouts, channels=16, text_len=4, text_dim=32,
                              pooled_dim=32)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


class Setup:
    def __init__(self, cfg):
        tx = optimizers.make_optimizer(cfg.optim, cfg.train.steps)
        self.graphdef, self.state = ts.init_train_state(tiny_model(), tx)
        self.statics = ts.make_statics(self.graphdef, cfg, tx=tx, guidance_embeds=True)
        self.step = ts.compile_train_step(self.statics, self.state, batch())

    def run(self, b, key=0, state=None):
        """One step from a copy of ``state`` (default: the initial state); the step donates its input."""
        return self.step(_copy(self.state if state is None else state), b, jax.random.key(key))


@pytest.fixture(scope="module")
def setup():
    return Setup(CFG)


def test_grad_accumulation_equals_big_batch(setup):
    acc = Setup(Config(lora=CFG.lora, optim=OptimConfig(**{**CFG.optim.__dict__, "grad_accum": 2}), train=CFG.train))
    b = batch()
    s1, m1 = setup.run(b, key=5)
    s2, m2 = acc.run(b, key=5)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    # Adam moments hold the (clipped) gradient itself after one update.
    assert_trees_close(s2.opt_state, s1.opt_state, 1e-5, scaled=True)
    # Adam's first step is ~lr * sign(g): elements with |g| ~ eps may differ by float noise.
    assert_trees_close(s2.lora, s1.lora, 1e-4)
    assert not np.allclose(np.asarray(jax.tree.leaves(s1.lora)[1]), np.asarray(jax.tree.leaves(setup.state.lora)[1]))


def test_padding_content_is_ignored_and_references_matter(setup):
    b = batch()
    s0, m0 = setup.run(b, key=1)
    noisy = {k: v.copy() for k, v in b.items()}
    pad = ~b["img_mask"]
    t = b["target"].shape[1]
    rng = np.random.default_rng(9)
    noisy["target"][pad[:, :t]] = rng.standard_normal((pad[:, :t].sum(), 16)) * 100
    noisy["references"][pad[:, t:]] = rng.standard_normal((pad[:, t:].sum(), 16)) * 100
    noisy["img_ids"][pad] = rng.integers(0, 50, (pad.sum(), 3))
    assert pad[:, :t].any() and pad[:, t:].any()
    s1, m1 = setup.run(noisy, key=1)
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-6)
    assert_trees_close(s1.lora, s0.lora, 1e-6)
    # Real reference tokens do feed the loss (so the mask is not hiding everything).
    changed = {k: v.copy() for k, v in b.items()}
    changed["references"][3, :4] += 1.0
    _, m2 = setup.run(changed, key=1)
    assert abs(float(m2["loss"]) - float(m0["loss"])) > 1e-6


def test_overfits_one_batch(setup):
    b = batch(seed=2)
    state, losses = _copy(setup.state), []
    for _ in range(60):  # fixed key: the same σ and noise every step, so the batch can be memorised
        state, m = setup.step(state, b, jax.random.key(3))
        losses.append(float(m["loss"]))
    assert losses[-1] <= losses[0] / 10, losses[::10]
    assert int(state.step) == 60 and int(state.skipped) == 0


def test_nonfinite_steps_are_skipped(setup):
    b = batch()
    bad = {k: v.copy() for k, v in b.items()}
    bad["target"][0, 0, 0] = np.nan
    s1, m1 = setup.run(bad)
    assert not bool(m1["finite"]) and int(m1["nonfinite"]) == 1
    assert_trees_close(s1.lora, setup.state.lora, 0)
    assert_trees_close(s1.opt_state, setup.state.opt_state, 0)
    s2, m2 = setup.step(s1, bad, jax.random.key(1))
    assert int(s2.nonfinite) == 2 and int(s2.skipped) == 2 and int(s2.step) == 2
    with pytest.raises(loop.NonFiniteError, match="2 consecutive steps"):
        loop.check_finite(jax.device_get(m2), 2, max_nonfinite=2)
    s3, m3 = setup.step(s2, b, jax.random.key(2))
    assert bool(m3["finite"]) and int(s3.nonfinite) == 0 and int(s3.skipped) == 2
    assert float(m3["lr"]) == pytest.approx(CFG.optim.lr)


def test_caption_dropout_uses_empty_prompt(setup):
    b = batch()
    empty = {"text": jnp.asarray(np.random.default_rng(5).standard_normal((4, 32)), jnp.float32),
             "pooled": jnp.asarray(np.random.default_rng(6).standard_normal(32), jnp.float32)}
    model = nnx.merge(setup.graphdef, setup.state.lora, setup.state.frozen)
    idx = jnp.arange(4)

    def loss(cfg, bb, empty_text=None):
        return jax.jit(lambda m, x: ts.flow_matching_loss(m, x, jax.random.key(3), idx, cfg, empty_text)[0])(model, bb)

    always = ts.StepConfig(caption_dropout=1.0)
    emptied = {**b, "text": np.broadcast_to(np.asarray(empty["text"]), b["text"].shape),
               "pooled": np.broadcast_to(np.asarray(empty["pooled"]), b["pooled"].shape)}
    np.testing.assert_allclose(float(loss(always, b, empty)), float(loss(ts.StepConfig(), emptied)), rtol=1e-6)
    draws = ts.sample_draws(jax.random.key(0), jnp.arange(4000), 1, 1, jnp.ones(4000), ts.StepConfig(caption_dropout=0.3))
    assert abs(float(draws["drop_caption"].mean()) - 0.3) < 0.03
    with pytest.raises(ValueError, match="empty-prompt embeddings"):
        loss(always, b)


# --------------------------------------------------------------------------- schedules vs diffusers


@pytest.mark.parametrize("scheme,kw", [("uniform", {}), ("logit_normal", dict(logit_mean=0.3, logit_std=0.8)),
                                       ("mode", dict(mode_scale=1.29))])
def test_sigma_samplers_match_diffusers(scheme, kw):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    n = 20000
    ours = np.asarray(train_sigmas.sample_sigmas(jax.random.split(jax.random.key(0), n), scheme, **kw))
    ref = compute_density_for_timestep_sampling(scheme, n, logit_mean=kw.get("logit_mean"),
                                                logit_std=kw.get("logit_std"), mode_scale=kw.get("mode_scale"),
                                                generator=torch.Generator().manual_seed(0)).numpy()
    assert ours.min() >= 0 and ours.max() <= 1
    q = np.linspace(0.02, 0.98, 25)
    np.testing.assert_allclose(np.quantile(ours, q), np.quantile(ref, q), atol=0.02)


def test_default_sigma_sampling_is_the_reference_trainers_uniform():
    """Default config: σ ~ U(0, 1), as diffusers' train_dreambooth_lora_flux_kontext.py (--weighting_scheme none ->
    compute_density_for_timestep_sampling's uniform branch) and qflux; training guidance 1.0."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    step = ts.StepConfig.from_config(Config())
    assert step.timestep_sampling == "uniform" and step.weighting == "none" and step.guidance == 1.0
    assert step.ids_dtype == "int32"
    from dreamomni2_jax.config import ModelConfig

    assert ts.StepConfig.from_config(Config(model=ModelConfig(ids_dtype="bfloat16"))).ids_dtype == "bfloat16"
    n = 20000
    ours = np.asarray(train_sigmas.sample_sigmas(jax.random.split(jax.random.key(1), n), step.timestep_sampling))
    ref = compute_density_for_timestep_sampling("none", n, generator=torch.Generator().manual_seed(1)).numpy()
    q = np.linspace(0.02, 0.98, 25)
    np.testing.assert_allclose(np.quantile(ours, q), np.quantile(ref, q), atol=0.02)


def test_sigma_sqrt_weight_is_bounded_like_diffusers():
    """diffusers' Kontext script weights σ from the scheduler's discrete training sigmas (smallest 1/1000): our
    continuous σ is clamped there, so the weight never exceeds diffusers' largest."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    assert float(sched.sigmas.min()) == pytest.approx(train_sigmas.SIGMA_MIN)
    ref = compute_loss_weighting_for_sd3("sigma_sqrt", sched.sigmas).numpy()
    ours = np.asarray(train_sigmas.loss_weighting(jnp.asarray(sched.sigmas.numpy()), "sigma_sqrt"))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    tiny = np.asarray(train_sigmas.loss_weighting(jnp.asarray([1e-7, 1e-4, 0.0]), "sigma_sqrt"))
    np.testing.assert_allclose(tiny, ref.max(), rtol=1e-5)


def test_sigmoid_shift_matches_flux_dynamic_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = np.linspace(0.01, 0.99, 50).astype(np.float32)
    for seq in (256, 1024, 4096):
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        assert float(train_sigmas.calculate_shift(seq)) == pytest.approx(mu, rel=1e-6)
        ref = sched.time_shift(mu, 1.0, torch.from_numpy(t)).numpy()
        np.testing.assert_allclose(np.asarray(train_sigmas.time_shift(mu, jnp.asarray(t))), ref, rtol=1e-5)
    keys = jax.random.split(jax.random.key(1), 4000)
    lo = np.asarray(train_sigmas.sample_sigmas(keys, "sigmoid_shift", seq_len=jnp.full(4000, 256.0)))
    hi = np.asarray(train_sigmas.sample_sigmas(keys, "sigmoid_shift", seq_len=jnp.full(4000, 4096.0)))
    assert np.all(hi > lo)  # bigger images -> noisier timesteps
    np.testing.assert_allclose(np.median(hi), math.exp(1.15) / (math.exp(1.15) + 1), atol=0.02)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_matches_diffusers(weighting):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sig = np.linspace(0.05, 0.95, 19).astype(np.float32)
    ref = compute_loss_weighting_for_sd3(weighting, torch.from_numpy(sig)).numpy()
    np.testing.assert_allclose(np.asarray(train_sigmas.loss_weighting(jnp.asarray(sig), weighting)), ref, rtol=1e-6)


def test_lr_schedules():
    cos = optimizers.lr_schedule(OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10), total_steps=110)
    assert float(cos(0)) == 0 and float(cos(5)) == pytest.approx(0.5) and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.5, abs=1e-6) and float(cos(110)) == pytest.approx(0.0, abs=1e-7)
    const = optimizers.lr_schedule(OptimConfig(lr=2.0, warmup_steps=4), total_steps=100)
    assert [float(const(i)) for i in (0, 2, 4, 99)] == [0.0, 1.0, 2.0, 2.0]


# --------------------------------------------------------------------------- FLOPs and loop


def _dot_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general in a (closed) jaxpr, scan bodies times their length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            a = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([a[i] for i in lc])
        for name, sub in eqn.params.items():
            subs = sub if isinstance(sub, (list, tuple)) else [sub]
            for s in subs:
                inner = getattr(s, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += _dot_flops(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
                elif hasattr(s, "eqns"):
                    total += _dot_flops(s) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def test_flops_formula_matches_traced_step(setup):
    b = batch()
    traced = jax.make_jaxpr(lambda st, bb, k: ts.train_step(st, bb, k, statics=setup.statics))(
        setup.state, b, jax.random.key(0))
    model = nnx.merge(setup.graphdef, setup.state.lora, setup.state.frozen)
    n, t, r = b["target"].shape[0], b["target"].shape[1], b["references"].shape[1]
    ours = perf.flux_train_flops(model.config, (n, t, r), b["text"].shape[1], perf.lora_dims(model))
    counted = _dot_flops(traced.jaxpr)
    assert abs(ours - counted) / counted < 0.02, (ours, counted)


def test_loop_writes_metrics_and_stops_on_nonfinite(tmp_path, setup):
    b = batch()

    class Stream:
        def __init__(self, bad_after):
            self.n, self.bad_after = 0, bad_after

        def __next__(self):
            self.n += 1
            out = {k: v.copy() for k, v in b.items()}
            if self.n > self.bad_after:
                out["target"][:] = np.inf
            return out

    class Recorder(loop.Callback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, ctx, metrics):
            self.steps.append((ctx.step, int(ctx.state.step)))

    def context(steps, run, stream, max_nonfinite=5):
        cfg = Config(lora=LORA, optim=OptimConfig(**{**CFG.optim.__dict__, "max_nonfinite": max_nonfinite}),
                     data=DataConfig(batch_size=4), train=TrainConfig(steps=steps, run_dir=str(tmp_path / run)))
        model = nnx.merge(setup.graphdef, setup.state.lora, setup.state.frozen)
        ctx = loop.LoopContext(cfg=cfg, mesh=loop.shd.make_mesh(cfg.mesh), statics=setup.statics,
                               state=_copy(setup.state), stream=stream, rng=jax.random.key(0),
                               step_fn=setup.step,  # reuse the compiled step
                               flux_config=model.config, lora_dims=perf.lora_dims(model))
        return ctx

    rec = Recorder()
    ctx = loop.train(context(3, "run", Stream(bad_after=99)), [rec], progress=False)
    assert ctx.step == 3 and rec.steps == [(1, 1), (2, 2), (3, 3)]
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["finite"] for r in recs)
    assert recs[2]["tokens_per_s"] > 0 and recs[2]["flops_per_step"] > 0 and recs[0]["lr"] == pytest.approx(CFG.optim.lr)
    with pytest.raises(loop.NonFiniteError, match="step 3: 2 consecutive"):
        loop.train(context(10, "run2", Stream(bad_after=1), max_nonfinite=2), progress=False)


def test_nonfinite_update_is_skipped_even_with_finite_loss_and_grads(setup):
    """A NaN / inf update (e.g. a diverged learning rate) must not reach the adapters or the optimizer state."""
    tx = setup.statics.tx

    def update(grads, state, params=None):
        updates, new_state = tx.update(grads, state, params)
        return jax.tree.map(lambda u: u * jnp.nan, updates), new_state

    import dataclasses

    import optax

    statics = dataclasses.replace(setup.statics, tx=optax.GradientTransformation(tx.init, update))
    step = ts.compile_train_step(statics, setup.state, batch())
    s1, m1 = step(_copy(setup.state), batch(), jax.random.key(0))
    assert np.isfinite(float(m1["loss"])) and np.isfinite(float(m1["grad_norm"]))
    assert not bool(m1["finite"]) and int(s1.skipped) == 1 and int(s1.nonfinite) == 1
    assert_trees_close(s1.lora, setup.state.lora, 0)
    assert_trees_close(s1.opt_state, setup.state.opt_state, 0)
