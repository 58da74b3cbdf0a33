"""Attention implementations against torch's scaled_dot_product_attention (values and gradients, masks)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dreamomni2_jax.models.attention import attention


def _inputs(b=2, s=200, h=3, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(4))
    mask = np.ones((b, s), bool)
    mask[1, 150:] = False  # padded keys of the second sample
    return q, k, v, do, mask


def _torch_ref(q, k, v, do, mask):
    tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(mask)[:, None, None, :])
    out.backward(torch.tensor(do.transpose(0, 2, 1, 3)))
    tr = lambda t: t.detach().numpy().transpose(0, 2, 1, 3)  # noqa: E731
    return tr(out), tr(tq.grad), tr(tk.grad), tr(tv.grad)


@pytest.mark.parametrize("impl", ["blocked", "xla", "auto"])
def test_attention_matches_torch_sdpa_with_mask_and_grads(impl):
    q, k, v, do, mask = _inputs()  # S=200: not a multiple of the 128 query block
    ref_out, ref_dq, ref_dk, ref_dv = _torch_ref(q, k, v, do, mask)

    def f(q, k, v):
        return jnp.sum(attention(q, k, v, jnp.asarray(mask), impl) * do)

    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), impl)
    dq, dk, dv = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    for ours, ref in [(out, ref_out), (dq, ref_dq), (dk, ref_dk), (dv, ref_dv)]:
        np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=1e-4)


def test_blocked_attention_bf16_inputs_keep_dtype_and_accuracy():
    q, k, v, do, mask = _inputs(s=130)
    ref_out = _torch_ref(*(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (q, k, v)), do,
                         mask)[0]
    out = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), jnp.asarray(mask), "blocked")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref_out, atol=2e-2, rtol=2e-2)
