"""Held-out loss: σ quantiles of each training σ distribution (vs scipy / diffusers' formulas), a deterministic
loss over the eval cache (vs a direct per-record computation), logged by scripts/train.py without touching the
training RNG stream."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from dreamomni2_jax.callbacks import eval_loss
from dreamomni2_jax.train import loop
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.config import LoraConfig, OptimConfig, TrainConfig


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode", "sigmoid_shift"])
def test_sigma_quantiles(sampling):
    cfg = ts.StepConfig(timestep_sampling=sampling, logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    seq = np.array([256.0, 1024.0])
    got = np.asarray(eval_loss.sigma_quantiles(8, cfg, jnp.asarray(seq)))
    u = (np.arange(8) + 0.5) / 8
    if sampling == "uniform":
        want = np.broadcast_to(u, (2, 8))
    elif sampling == "mode":  # diffusers compute_density_for_timestep_sampling("mode")
        want = np.broadcast_to(1 - u - 1.29 * (np.cos(math.pi * u / 2) ** 2 - 1 + u), (2, 8))
    else:
        t = special.expit(stats.norm.ppf(u, loc=0.3, scale=0.8))
        want = np.broadcast_to(t, (2, 8))
        if sampling == "sigmoid_shift":  # Flux's calculate_shift + exponential time shift
            mu = 0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256)
            want = np.exp(mu)[:, None] / (np.exp(mu)[:, None] + (1 / t - 1))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.fixture(scope="module")
def eval_run(tiny_cache, tiny_converted_dir, tmp_path_factory):
    cfg, _, cache = tiny_cache
    run = tmp_path_factory.mktemp("eval")
    base = dataclasses.replace(
        cfg, lora=LoraConfig(rank=2, alpha=2.0), optim=OptimConfig(lr=1e-2),
        data=dataclasses.replace(cfg.data, cache_dir="", batch_size=2, synthetic_resolution=(64, 64),
                                 synthetic_refs=((64, 64),)),
        model=dataclasses.replace(cfg.model, attention="xla", remat="none"),
        train=TrainConfig(steps=4, run_dir=str(run / "plain")))
    with_eval = dataclasses.replace(base, data=dataclasses.replace(base.data, eval_cache_dir=str(cache)),
                                    train=dataclasses.replace(base.train, eval_every=2, eval_sigmas=3,
                                                              run_dir=str(run / "eval")))
    out = {}
    for name, c in (("plain", base), ("eval", with_eval)):
        ctx = loop.setup(c)
        cbs = [eval_loss.EvalLossCallback(c)] if c.train.eval_every else []
        loop.train(ctx, cbs, progress=False)
        out[name] = (c, ctx, [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()])
    return out


def test_held_out_loss_is_logged_and_leaves_training_alone(eval_run):
    _, _, plain = eval_run["plain"]
    c, ctx, recs = eval_run["eval"]
    train = [r for r in recs if "loss" in r]
    ev = sorted((r for r in recs if "eval_loss" in r), key=lambda r: r["step"])
    assert [r["loss"] for r in train] == [r["loss"] for r in plain]  # same training stream, bitwise
    assert [r["step"] for r in ev] == [2, 4] and ev[0]["eval_loss"] != ev[1]["eval_loss"]
    assert len(ev[0]["eval_loss_by_sigma"]) == 3
    np.testing.assert_allclose(ev[1]["eval_loss"], np.mean(ev[1]["eval_loss_by_sigma"]), rtol=1e-12)
    held = eval_loss.HeldOut(c)
    again = held.evaluate(ctx.statics, ctx.state)
    assert again["eval_loss"] == pytest.approx(ev[1]["eval_loss"], rel=1e-6)
    assert held.evaluate(ctx.statics, ctx.state) == again  # deterministic


def test_held_out_loss_matches_per_record_computation(eval_run):
    """Each record alone, at the same σ quantiles with noise from (record, σ): their mean is the logged loss."""
    c, ctx, _ = eval_run["eval"]
    held = eval_loss.HeldOut(c)
    assert sum(int(v.sum()) for *_, v in held.batches) == held.num_records  # every record once
    cfg = eval_loss.dataclasses_replace_no_dropout(ctx.statics.cfg)
    model = ctx.model()
    per = {}
    for local, record, valid in held.batches:
        for i in np.flatnonzero(valid):
            one = {k: v[i:i + 1] for k, v in local.items()}
            t, ch = one["target"].shape[1:]
            sig = eval_loss.sigma_quantiles(3, cfg, jnp.asarray(one["img_mask"][:, :t].sum(1), jnp.float32))
            vals = []
            for k in range(3):
                noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(
                    jax.random.key(eval_loss.EVAL_SEED), int(record[i])), k), (t, ch), jnp.float32)[None]
                d = {"sigma": sig[:, k], "noise": noise, "drop_caption": jnp.zeros((1,), bool)}
                vals.append(float(ts.per_sample_losses(model, one, d, cfg)[0][0]))
            per[int(record[i])] = vals
    assert sorted(per) == list(range(held.num_records))
    want = np.mean(list(per.values()), axis=0)
    got = held.evaluate(ctx.statics, ctx.state)
    np.testing.assert_allclose(got["eval_loss_by_sigma"], want, rtol=1e-4)
