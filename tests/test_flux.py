"""Flux transformer (Flax NNX) vs diffusers ``FluxTransformer2DModel`` on the tiny random checkpoints."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from support.asserts import assert_close
from dreamomni2_jax.convert.flux_transformer import main as convert_main
from dreamomni2_jax.layout import ids_flux1 as P
from dreamomni2_jax.models.attention import attention, splash_attention
from dreamomni2_jax.models.flux import FluxConfig, abstract_flux
from dreamomni2_jax.models.stacked import joint_mask
from dreamomni2_jax.convert.loaders import load_flux

TXT = 7
# Target latent (h, w) and two references of different sizes.
LAYOUT = P.SampleLayout(target=(4, 6), references=((4, 4), (2, 6)))


def _inputs(cfg: FluxConfig, seed: int, layout=LAYOUT, batch: int = 2):
    rng = np.random.default_rng(seed)
    n = layout.target_tokens + layout.reference_tokens
    return dict(
        hidden_states=rng.standard_normal((batch, n, cfg.in_channels), np.float32),
        encoder_hidden_states=rng.standard_normal((batch, TXT, cfg.joint_attention_dim), np.float32),
        pooled_projections=rng.standard_normal((batch, cfg.pooled_projection_dim), np.float32),
        timestep=rng.uniform(0, 1, batch).astype(np.float32),
        img_ids=layout.ids(),
        txt_ids=P.text_ids(TXT),
        guidance=np.full(batch, 3.5, np.float32) if cfg.guidance_embeds else None,
    )


def _reference(transformer_dir, inputs):
    from diffusers import FluxTransformer2DModel as TorchFlux

    ref = TorchFlux.from_pretrained(transformer_dir, torch_dtype=torch.float32).eval()
    kw = {k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return ref(**kw, return_dict=False)[0].numpy()


def _convert(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux") / "converted"
    assert convert_main(["--src", str(pipe / "transformer"), "--out", str(out), "--dtype", "fp32",
                         "--no-progress"]) == 0
    return pipe / "transformer", out


@pytest.fixture(scope="module")
def converted(tiny_pipeline_dir, tmp_path_factory):
    return _convert(tiny_pipeline_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def converted_noguidance(tiny_pipeline_dir_noguidance, tmp_path_factory):
    return _convert(tiny_pipeline_dir_noguidance, tmp_path_factory)


@pytest.fixture(scope="module")
def fp32_model(converted):
    return load_flux(converted[1], dtype=jnp.float32)


@nnx.jit
def _forward(model, inputs):
    return model(**inputs)


@pytest.mark.parametrize("which", ["converted", "converted_noguidance"])
def test_parity_with_diffusers_fp32(request, which):
    src, out = request.getfixturevalue(which)
    model = load_flux(out, dtype=jnp.float32)
    cfg = model.config
    assert cfg == FluxConfig.from_json(src / "config.json")
    assert cfg.guidance_embeds == (which == "converted")
    for seed, layout in ((0, LAYOUT), (1, P.SampleLayout(target=(6, 4), references=((2, 2), (4, 8))))):
        inputs = _inputs(cfg, seed, layout)
        want = _reference(src, inputs)
        got = np.asarray(_forward(model, inputs))
        assert got.shape == want.shape == (2, layout.target_tokens + layout.reference_tokens, cfg.out_dim)
        assert_close(got, want, 1e-4, f"seed {seed}")


def test_bf16_close_to_fp32(converted, fp32_model):
    inputs = _inputs(fp32_model.config, 2)
    ref = np.asarray(_forward(fp32_model, inputs))
    model = load_flux(converted[1], dtype=jnp.bfloat16)
    assert model.x_embedder.kernel[...].dtype == jnp.bfloat16
    assert model.transformer_blocks.attn.norm_q.scale[...].dtype == jnp.float32
    got = np.asarray(_forward(model, inputs)).astype(np.float32)
    assert np.isfinite(got).all()
    assert_close(got, ref, 0.05)


def test_masked_padding_does_not_change_real_tokens(fp32_model):
    cfg = fp32_model.config
    samples = [LAYOUT, P.SampleLayout(target=(2, 4), references=((2, 2),))]
    batch = P.batch_layout(samples)
    rng = np.random.default_rng(3)
    n = batch.ids.shape[1]
    common = _inputs(cfg, 3, batch=2)
    x = rng.standard_normal((2, n, cfg.in_channels), np.float32)
    padded = {**common, "hidden_states": x, "img_ids": batch.ids, "attention_mask": batch.mask}
    out = np.asarray(_forward(fp32_model, padded))
    # Changing everything at padded positions must not move real tokens.
    x2 = np.where(batch.mask[..., None], x, 100.0 * rng.standard_normal(x.shape, np.float32))
    out2 = np.asarray(_forward(fp32_model, {**padded, "hidden_states": x2}))
    np.testing.assert_array_equal(out[batch.mask], out2[batch.mask])
    # The padded sample alone (no padding, no mask) gives the same real-token outputs.
    b, real = 1, batch.mask[1]
    alone = {k: (v[b:b + 1] if k in ("encoder_hidden_states", "pooled_projections", "timestep", "guidance")
                 and v is not None else v) for k, v in common.items()}
    alone.update(hidden_states=x[b:b + 1, real], img_ids=samples[b].ids())
    np.testing.assert_allclose(np.asarray(_forward(fp32_model, alone))[0], out[b, real], atol=2e-5, rtol=1e-5)
    # An image-only mask [B, S_img] means "text all real".
    full = joint_mask(jnp.asarray(batch.mask), 2, TXT, n)
    np.testing.assert_array_equal(full, np.concatenate([np.ones((2, TXT), bool), batch.mask], axis=1))


def test_per_sample_ids_match_shared_ids(fp32_model):
    inputs = _inputs(fp32_model.config, 4)
    shared = np.asarray(_forward(fp32_model, inputs))
    per_sample = dict(inputs, img_ids=np.broadcast_to(inputs["img_ids"], (2, *inputs["img_ids"].shape)),
                      txt_ids=np.broadcast_to(inputs["txt_ids"], (2, TXT, 3)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(_forward(fp32_model, per_sample)), shared, atol=1e-6)


def test_remat_policies_same_value_and_grad(fp32_model):
    cfg = fp32_model.config
    inputs = _inputs(cfg, 5)
    state = nnx.state(fp32_model)

    def loss_fn(remat):
        graphdef = nnx.graphdef(abstract_flux(cfg, dtype=jnp.float32, param_dtype=jnp.float32, remat=remat))

        def loss(st):
            return jnp.mean(jnp.square(nnx.merge(graphdef, st)(**inputs)))

        return loss

    # "full" is checked structurally (a remat primitive per scanned layer stack); "dots_saveable" numerically.
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss_fn("none")))(state))
    assert str(jax.make_jaxpr(jax.grad(loss_fn("full")))(state)).count("remat") >= 2
    base_loss, base_grad = jax.jit(jax.value_and_grad(loss_fn("none")))(state)
    val, grad = jax.jit(jax.value_and_grad(loss_fn("dots_saveable")))(state)
    np.testing.assert_allclose(val, base_loss, rtol=1e-6)
    g0, g1 = jax.tree.leaves(base_grad), jax.tree.leaves(grad)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)
    assert float(jnp.abs(base_grad["transformer_blocks"]["attn"]["to_q"]["kernel"][...]).max()) > 0


def test_input_errors(fp32_model):
    inputs = _inputs(fp32_model.config, 6)
    wrong_guidance = None if fp32_model.config.guidance_embeds else np.ones(2, np.float32)
    with pytest.raises(ValueError, match="guidance"):
        fp32_model(**{**inputs, "guidance": wrong_guidance})
    with pytest.raises(TypeError, match="never bf16"):
        fp32_model(**{**inputs, "img_ids": jnp.asarray(inputs["img_ids"], jnp.bfloat16)})
    with pytest.raises(ValueError, match="attention_mask"):
        fp32_model(**inputs, attention_mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="img_ids"):
        fp32_model(**{**inputs, "img_ids": inputs["img_ids"][:-1]})


def test_config_and_constructor_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown FluxTransformer2DModel config fields.*'num_heads'"):
        FluxConfig.from_dict({"_class_name": "FluxTransformer2DModel", "num_heads": 3})
    path = tmp_path / "config.json"
    path.write_text('{"_diffusers_version": "0.35", "num_layers": 2, "guidance_embeds": false}')
    cfg = FluxConfig.from_json(path)
    assert (cfg.num_layers, cfg.guidance_embeds, cfg.num_single_layers, cfg.axes_dims_rope) == (2, False, 38,
                                                                                                   (16, 56, 56))
    assert FluxConfig.from_dict(cfg.to_dict()) == cfg
    tiny = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=1,
                      axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match="attention_impl"):
        abstract_flux(tiny, attention_impl="flash")
    with pytest.raises(ValueError, match="remat"):
        abstract_flux(tiny, remat="some")
    if jax.default_backend() != "tpu":
        q = jnp.ones((1, 128, 1, 16))
        with pytest.raises(ValueError, match="needs a TPU target"):
            attention(q, q, q, None, "splash")


def test_splash_hook_matches_xla_in_interpret_mode():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 256, 2, 32)), jnp.float32) for _ in range(3))
    mask = np.ones((2, 256), bool)
    mask[1, 200:] = False
    got = np.asarray(splash_attention(q, k, v, jnp.asarray(mask), interpret=True))
    want = np.asarray(attention(q, k, v, jnp.asarray(mask), "xla"))
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_n_out_computes_only_the_first_tokens_and_matches_full_output(impl):
    """The train loss reads only target tokens: ``n_out`` skips the rest in the last block, same values."""
    from dreamomni2_jax.testing.tiny_flux1 import flux_model

    m = flux_model(0, attention_impl=impl)
    fc = m.config
    r = np.random.default_rng(0)
    n_img, n_txt = 24, 8
    hs = jnp.asarray(r.standard_normal((2, n_img, fc.in_channels)), jnp.float32)
    ctx = jnp.asarray(r.standard_normal((2, n_txt, fc.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(r.standard_normal((2, fc.pooled_projection_dim)), jnp.float32)
    ids = jnp.asarray(r.integers(0, 10, (n_img, 3)), jnp.int32)
    tids = jnp.zeros((n_txt, 3), jnp.int32)
    mask = jnp.ones((2, n_img), bool).at[1, -3:].set(False)
    full = m(hs, ctx, pooled, 0.5, ids, tids, guidance=1.0, attention_mask=mask)
    part = m(hs, ctx, pooled, 0.5, ids, tids, guidance=1.0, attention_mask=mask, n_out=10)
    assert full.shape == (2, n_img, fc.out_dim) and part.shape == (2, 10, fc.out_dim)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, :10]), atol=1e-5 * float(jnp.max(jnp.abs(full))))
    with pytest.raises(ValueError):
        m(hs, ctx, pooled, 0.5, ids, tids, guidance=1.0, n_out=n_img + 1)
