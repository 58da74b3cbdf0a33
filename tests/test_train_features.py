"""Training features of issue 16 at the step level on the tiny model: masked loss (vs NumPy), reference dropout,
grad-accumulation equivalence with both, EMA (vs diffusers' EMAModel), every optimizer (trains, resumes bitwise
through an Orbax checkpoint)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import ndimage

from dreamomni2_jax.checkpoint import store as C
from dreamomni2_jax.data import stream as data, loss_mask, ref_dropout
from dreamomni2_jax.train import optimizers
from dreamomni2_jax.layout import ids_flux1 as positions
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.config import Config, ConfigError, OptimConfig, SampleConfig, TrainConfig
from test_train_step import CFG, LAYOUTS, _copy, batch, tiny_model


def _setup(cfg, b, ema=False):
    tx = optimizers.make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, state = ts.init_train_state(tiny_model(), tx, ema=ema)
    statics = ts.make_statics(graphdef, cfg, tx=tx, guidance_embeds=True)
    return graphdef, state, statics, ts.compile_train_step(statics, state, b)


def _weights(b, seed=0):
    """Per-token weights in [0, 1] with zeros on padding (as the loader builds them); sample 3's mask is empty."""
    t = b["target"].shape[1]
    w = np.random.default_rng(seed).uniform(size=(b["target"].shape[0], t)).astype(np.float32)
    w[np.random.default_rng(seed + 1).uniform(size=w.shape) < 0.3] = 0.0
    w[3] = 0.0
    return w * b["img_mask"][:, :t]


# --------------------------------------------------------------------------- masked loss


def test_token_weights_and_difference_mask_vs_numpy():
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(6, 8)).astype(np.float32)
    want = [m[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for i in range(3) for j in range(4)]  # row-major 2x2 patches
    np.testing.assert_allclose(loss_mask.token_weights(m), want, rtol=1e-6)
    tgt, src = rng.standard_normal((2, 12, 10, 4)).astype(np.float32)
    src[:6] = tgt[:6]  # top half identical
    for radius in (0, 1, 2):
        changed = np.abs(tgt - src).mean(-1) > 0.5
        ref = ndimage.binary_dilation(changed, np.ones((2 * radius + 1,) * 2, bool)) if radius else changed
        np.testing.assert_array_equal(loss_mask.difference_mask(tgt, src, 0.5, radius), ref.astype(np.float32))
    arrays = {"target": tgt, "ref0": src}
    assert loss_mask.sample_weights(arrays, {"task": "generation"}, "difference").min() == 1.0  # no source
    w = loss_mask.sample_weights(arrays, {"task": "editing"}, "difference", 0.5, 0)
    np.testing.assert_array_equal(w, loss_mask.token_weights(loss_mask.difference_mask(tgt, src, 0.5, 0)))
    assert w[:15].max() == 0.0 and w[15:].min() > 0  # rows 0-5 = tokens 0-14 unchanged


@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_masked_loss_matches_numpy(floor):
    cfg = dataclasses.replace(ts.StepConfig.from_config(CFG), mask_floor=floor)
    model = tiny_model()
    b = batch()
    w = _weights(b)
    rng, idx = jax.random.key(4), jnp.arange(4)
    loss, aux = ts.flow_matching_loss(model, {**b, "loss_weight": w}, rng, idx, cfg)
    # the same draws and prediction, then the weighted mean by hand
    t, c = b["target"].shape[1:]
    tmask = b["img_mask"][:, :t].astype(np.float32)
    d = ts.sample_draws(rng, idx, t, c, jnp.asarray(tmask.sum(1)), cfg)
    s = np.asarray(d["sigma"])[:, None, None]
    noise = np.asarray(d["noise"])
    x_t = (1 - s) * b["target"] + s * noise
    pred = np.asarray(model(jnp.concatenate([x_t, b["references"]], 1), b["text"], b["pooled"], d["sigma"],
                            b["img_ids"], jnp.zeros((4, 3), jnp.int32), guidance=1.0,
                            attention_mask=b["img_mask"], n_out=t), np.float64)
    err = (pred - (noise - b["target"])) ** 2
    ww = (floor + (1 - floor) * w) * tmask
    den = ww.sum(1) * c
    per = np.where(den > 0, (err * ww[:, :, None]).sum((1, 2)) / np.where(den > 0, den, 1), 0.0)  # empty mask: 0
    np.testing.assert_allclose(float(loss), per.mean(), rtol=1e-5)
    # all-ones weights are today's unmasked loss
    plain, _ = ts.flow_matching_loss(model, b, rng, idx, cfg)
    ones, _ = ts.flow_matching_loss(model, {**b, "loss_weight": tmask}, rng, idx, cfg)
    np.testing.assert_allclose(float(ones), float(plain), rtol=1e-6)


# --------------------------------------------------------------------------- reference dropout


def _record(rng, layout):
    return {"target": rng.standard_normal((*layout.target, 4)).astype(np.float32),
            **{f"ref{j}": rng.standard_normal((*r, 4)).astype(np.float32) for j, r in enumerate(layout.references)},
            "text": rng.standard_normal((4, 32)).astype(np.float32), "pooled": rng.standard_normal(32).astype(np.float32)}


def test_reference_dropout_is_a_sample_with_fewer_references():
    rng = np.random.default_rng(0)
    recs = [_record(rng, lay) for lay in LAYOUTS]
    opts = data.SampleOptions(reference_dropout=0.5, seed=3)
    got = data.process_samples([(r, {}) for r in recs], 40, opts, "dreamomni2", None, None)
    full = data.assemble_batch(recs, "dreamomni2")
    assert got["references"].shape == full["references"].shape  # shapes kept: no recompiles
    dropped_any = False
    for i, r in enumerate(recs):
        n = sum(k.startswith("ref") for k in r)
        keep = ref_dropout.kept(n, 0.5, 3, 40 + i)
        assert keep[0] == 0 and keep == sorted(keep)
        dropped_any |= len(keep) < n
        fewer = {"target": r["target"], "text": r["text"], "pooled": r["pooled"],
                 **{f"ref{k}": r[f"ref{j}"] for k, j in enumerate(keep)}}
        alone = data.assemble_batch([fewer], "dreamomni2", full["target"].shape[1], full["references"].shape[1])
        for key in ("target", "references", "img_ids", "img_mask"):
            np.testing.assert_array_equal(got[key][i], alone[key][0], err_msg=key)
    assert dropped_any
    # ids of the kept references are contiguous domains 1..k, as a record that had k references
    lay = positions.SampleLayout((4, 6), ((2, 2), (4, 2)))
    assert set(np.unique(positions.batch_layout([lay]).ids[0, 6:, 0])) == {1, 2}
    # rate and determinism
    draws = [ref_dropout.kept(3, 0.3, 7, g) for g in range(2000)]
    assert draws == [ref_dropout.kept(3, 0.3, 7, g) for g in range(2000)]
    rate = 1 - np.mean([len(k) - 1 for k in draws]) / 2
    assert 0.26 < rate < 0.34
    assert ref_dropout.kept(3, 0.0, 7, 5) == [0, 1, 2]


def test_grad_accumulation_with_masks_and_reference_dropout():
    rng = np.random.default_rng(1)
    recs = [_record(rng, lay) for lay in LAYOUTS]
    for r in recs:
        r["ref0"] = r["target"].copy()  # an editing pair: the source differs from the target in its top rows
        r["ref0"][:2] += 3.0
    opts = data.SampleOptions(reference_dropout=0.5, seed=0, loss_mask="difference", mask_threshold=0.8,
                              mask_dilate=0)
    b = data.process_samples([(r, {"task": "editing"}) for r in recs], 8, opts, "dreamomni2", None, None)
    assert 0 < b["loss_weight"].sum() < b["img_mask"][:, :b["target"].shape[1]].sum()
    cfg1 = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, loss_mask="difference", mask_floor=0.1))
    cfg2 = dataclasses.replace(cfg1, optim=dataclasses.replace(CFG.optim, grad_accum=2))
    _, st1, _, f1 = _setup(cfg1, b)
    _, st2, _, f2 = _setup(cfg2, b)
    s1, m1 = f1(st1, b, jax.random.key(5))
    s2, m2 = f2(st2, b, jax.random.key(5))
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)


# --------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_diffusers_ema_model(warmup):
    from diffusers.training_utils import EMAModel

    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, ema_decay=0.8, ema_warmup=warmup))
    b = batch()
    _, state, _, step = _setup(cfg, b, ema=True)
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]  # noqa: E731
    params = [torch.nn.Parameter(torch.tensor(x)) for x in leaves(state.lora)]
    ema = EMAModel(params, decay=0.8) if warmup else None
    want = leaves(state.lora)
    for k in range(4):
        state, m = step(state, b, jax.random.key(k))
        assert bool(m["finite"])
        new = leaves(state.lora)
        if warmup:  # diffusers' default decay: min(decay, (1 + n) / (10 + n))
            with torch.no_grad():
                for p, x in zip(params, new):
                    p.copy_(torch.tensor(x))
            ema.step(params)
            want = [p.numpy() for p in ema.shadow_params]
        else:
            want = [0.8 * e + 0.2 * x for e, x in zip(want, new)]
    for got, w in zip(leaves(state.ema), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-7)
    assert not np.allclose(leaves(state.ema)[1], leaves(state.lora)[1])


# --------------------------------------------------------------------------- optimizers


OPTIMS = {"adamw": dict(lr=3e-2), "prodigy": dict(lr=1.0), "schedule_free_adamw": dict(lr=3e-2),
          "muon": dict(lr=3e-2), "adafactor": dict(lr=3e-2)}


@pytest.mark.parametrize("name", list(OPTIMS))
def test_optimizer_trains_and_resumes_bitwise(name, tmp_path):
    cfg = dataclasses.replace(CFG, optim=OptimConfig(name=name, weight_decay=0.0, grad_clip=1.0, **OPTIMS[name]),
                              train=dataclasses.replace(CFG.train, ema_decay=0.9))
    b = batch(seed=2)
    _, state0, statics, step = _setup(cfg, b, ema=True)
    keys = [jax.random.key(3)] * 12  # fixed σ and noise: the batch can be memorised
    state, losses = _copy(state0), []
    for k in keys:
        state, m = step(state, b, k)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)), (name, losses)
    if name == "prodigy":  # starts from a tiny step-size estimate (d0 = 1e-6) that grows: the descent speeds up
        assert np.all(np.diff(losses) < 0) and losses[6] - losses[11] > 2 * (losses[0] - losses[5]), losses
    else:
        assert losses[-1] < 0.8 * losses[0], (name, losses)
    # resume: 6 steps, Orbax checkpoint, restore into a fresh state, 6 more -> bitwise the straight run
    half = _copy(state0)
    for k in keys[:6]:
        half, _ = step(half, b, k)
    with C.open_run(tmp_path, cfg, async_save=False) as ck:
        ck.save(6, half.trainable(), None, None, force=True)
    with C.open_run(tmp_path, cfg, async_save=False) as ck:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state0.trainable())
        restored, _, _, at = ck.restore(6, abstract)
    assert at == 6
    resumed = _copy(state0).replace_trainable(restored)
    for k in keys[6:]:
        resumed, _ = step(resumed, b, k)
    for a, bb in zip(jax.tree.leaves(resumed.trainable()), jax.tree.leaves(state.trainable())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(bb))
    evalp = optimizers.eval_params(cfg.optim, state.opt_state, state.lora)
    changed = [not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(evalp), jax.tree.leaves(state.lora))]
    assert any(changed) == (name == "schedule_free_adamw")


def test_feature_config_errors():
    with pytest.raises(ConfigError, match="optim.name"):
        OptimConfig(name="sgd")._validate()
    with pytest.raises(ConfigError, match="schedule_free_warmup"):
        Config(optim=OptimConfig(name="schedule_free_adamw", warmup_steps=10))
    with pytest.raises(ConfigError, match="sample.use_ema"):
        Config(sample=SampleConfig(use_ema=True))
    with pytest.raises(ConfigError, match="train.loss_mask"):
        Config(train=TrainConfig(loss_mask="region"))
    with pytest.raises(ConfigError, match="train.mask_floor"):
        Config(train=TrainConfig(mask_floor=1.5))
    with pytest.raises(ConfigError, match="data.reference_dropout"):
        Config(data=dataclasses.replace(Config().data, reference_dropout=-0.1))


def test_validation_and_export_model_use_ema_or_schedule_free_point(tmp_path):
    from dreamomni2_jax.train import loop
    from dreamomni2_jax.callbacks.validation import make_validation_callback

    cfg = dataclasses.replace(CFG, optim=OptimConfig(name="schedule_free_adamw", lr=3e-2),
                              train=dataclasses.replace(CFG.train, ema_decay=0.5),
                              sample=SampleConfig(use_ema=True, every_steps=1))
    b = batch()
    graphdef, state, statics, step = _setup(cfg, b, ema=True)
    for k in range(2):
        state, _ = step(state, b, jax.random.key(k))
    ctx = loop.LoopContext(cfg=cfg, mesh=None, statics=statics, state=state, stream=None, rng=jax.random.key(0))
    flat = lambda m: jax.tree.leaves(nnx.state(m, ts.LoRAParam))  # noqa: E731
    hook = make_validation_callback(cfg, None, tmp_path, tmp_path / "run")
    for got, want in zip(flat(hook.transformer_getter(ctx)), jax.tree.leaves(state.ema)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    x = optimizers.eval_params(cfg.optim, state.opt_state, state.lora)
    for got, want in zip(flat(ctx.model()), jax.tree.leaves(x)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=0.0),
                                sample=SampleConfig())
    _, st0, statics0, _ = _setup(plain, b)
    with pytest.raises(ValueError, match="train.ema_decay is 0"):
        loop.LoopContext(cfg=plain, mesh=None, statics=statics0, state=st0, stream=None,
                         rng=jax.random.key(0)).model(ema=True)
