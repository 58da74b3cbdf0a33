"""The train step on FLUX.2 [klein] (tiny ``Flux2Transformer2DModel``): the loss is the flow-matching loss of the
diffusers model with the same inputs (4-axis ids, no guidance, no pooled text). The sharded / remat / accumulation
step: tests/multidevice/test_klein_step_sharded.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dreamomni2_jax.data import stream as data
from dreamomni2_jax.train import step as ts
from dreamomni2_jax.layout.ids_flux1 import SampleLayout as S

LAYOUTS = [S((4, 4), ((4, 4),)), S((4, 6), ((4, 4), (2, 4))), S((4, 6), ((2, 2), (2, 4), (4, 2))),
           S((2, 4), ((4, 4), (4, 4), (2, 2)))]


def test_klein_loss_is_the_diffusers_models_flow_matching_loss(tmp_path):
    """Our step's loss on a batch of 4 samples (1-3 references, padded) = the loss computed from the diffusers
    transformer (same weights) run per sample on its real tokens with the step's own σ / noise draws."""
    from dreamomni2_jax.convert.loaders import load_flux2
    from dreamomni2_jax.testing.tiny_klein import save_flux2_transformer
    from diffusers import Flux2Transformer2DModel

    src = save_flux2_transformer(tmp_path / "transformer", seed=3)
    model = load_flux2(src, dtype=jnp.float32)
    batch = data.synthetic_batch(np.random.default_rng(0), LAYOUTS, channels=16, text_len=5, text_dim=96,
                                 pooled_dim=0, scheme="flux2")
    assert batch["img_ids"].shape[-1] == 4 and batch["pooled"].shape == (4, 0)
    cfg = ts.StepConfig(guidance=None)
    rng = jax.random.key(5)
    idx = jnp.arange(4, dtype=jnp.int32)
    loss, _ = ts.flow_matching_loss(model, batch, rng, idx, cfg)
    t_len = batch["target"].shape[1]
    draws = ts.sample_draws(rng, idx, t_len, 16, jnp.asarray(batch["img_mask"][:, :t_len].sum(1), jnp.float32), cfg)
    ref = Flux2Transformer2DModel.from_pretrained(src).eval()
    from dreamomni2_jax.layout.ids_klein import text_ids

    losses = []
    for i, lay in enumerate(LAYOUTS):
        t, r = lay.target_tokens, lay.reference_tokens
        x0, noise = batch["target"][i, :t], np.asarray(draws["noise"][i, :t])
        s = float(draws["sigma"][i])
        xt = (1 - s) * x0 + s * noise
        hid = np.concatenate([xt, batch["references"][i, :r]])[None]
        ids = np.concatenate([batch["img_ids"][i, :t], batch["img_ids"][i, t_len:t_len + r]])[None]
        with torch.no_grad():
            pred = ref(hidden_states=torch.from_numpy(hid.astype(np.float32)),
                       encoder_hidden_states=torch.from_numpy(batch["text"][i:i + 1]),
                       timestep=torch.tensor([s], dtype=torch.float32), img_ids=torch.from_numpy(ids),
                       txt_ids=torch.from_numpy(text_ids(5)[None]), guidance=None, return_dict=False)[0].numpy()
        losses.append(np.mean((pred[0, :t] - (noise - x0)) ** 2))
    np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
