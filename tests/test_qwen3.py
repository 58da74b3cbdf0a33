"""Qwen3 text encoder (Flax NNX) vs transformers ``Qwen3ForCausalLM`` / ``Flux2KleinPipeline`` prompt embeddings on a
tiny random checkpoint, through our converter."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from support.asserts import rel_err
from dreamomni2_jax.convert.qwen3 import main as convert_main
from dreamomni2_jax.models.qwen3 import Qwen3Config, prompt_embeds
from dreamomni2_jax.convert.loaders import load_qwen3
from dreamomni2_jax.testing.tiny_klein import QWEN3_TINY, QWEN3_TINY_LAYERS, save_qwen3
from support.fixtures_klein import meta_reader

S = 12


def _ids(seed: int, lengths=(S, 7)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, QWEN3_TINY["vocab_size"], (len(lengths), S)).astype(np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = QWEN3_TINY["pad_token_id"]  # right padding, as the klein tokenizer pads to max_length
    return ids, mask


class _FixedTokenizer:
    """Stands in for the Qwen2 tokenizer in ``_get_qwen3_prompt_embeds``: prompt i -> row i of fixed ids."""

    def __init__(self, ids, mask):
        self.ids, self.mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def apply_chat_template(self, messages, **kw):
        return messages[0]["content"]

    def __call__(self, text, **kw):
        i = int(text)
        return {"input_ids": self.ids[i:i + 1], "attention_mask": self.mask[i:i + 1]}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    src = save_qwen3(tmp_path_factory.mktemp("qwen3") / "text_encoder", seed=2)
    out = src.parent / "converted"
    assert convert_main(["--src", str(src), "--out", str(out), "--dtype", "fp32", "--no-progress"]) == 0
    ref = Qwen3ForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    return src, out, ref, load_qwen3(out, dtype=jnp.float32)


def test_all_hidden_states_match_transformers(qwen):
    src, _, ref, model = qwen
    assert model.config == Qwen3Config.from_json(src / "config.json")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA exercised
    ids, mask = _ids(0)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   output_hidden_states=True, use_cache=False).hidden_states
    got = nnx.jit(lambda m, i, a: m.hidden_states(i, a))(model, ids, mask)
    assert len(got) == len(want) == QWEN3_TINY["num_hidden_layers"] + 1
    for k, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w.numpy()) <= 1e-4, k
    np.testing.assert_allclose(np.asarray(model(ids, mask)), np.asarray(got[-1]), rtol=0, atol=1e-5)  # = last


def test_prompt_embeds_match_klein_pipeline(qwen):
    from diffusers import Flux2KleinPipeline

    _, _, ref, model = qwen
    ids, mask = _ids(1)
    with torch.no_grad():
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            ref, _FixedTokenizer(ids, mask), ["0", "1"], dtype=torch.float32, device=torch.device("cpu"),
            max_sequence_length=S, hidden_states_layers=QWEN3_TINY_LAYERS).numpy()
    got = nnx.jit(lambda m, i, a: prompt_embeds(m, i, a, QWEN3_TINY_LAYERS))(model, ids, mask)
    assert got.shape == want.shape == (2, S, 3 * QWEN3_TINY["hidden_size"])
    assert rel_err(got, want) <= 1e-4
    # the rows the pipeline feeds the transformer include padded positions: those match too (checked above);
    # real tokens do not depend on what sits in the padded positions
    ids2 = ids.copy()
    ids2[1, 7:] = 5
    got2 = prompt_embeds(model, ids2, mask, QWEN3_TINY_LAYERS)
    np.testing.assert_allclose(np.asarray(got2)[1, :7], np.asarray(got)[1, :7], rtol=0, atol=1e-6)


def test_untied_lm_head_is_skipped_and_stray_keys_fail(tmp_path):
    from safetensors.torch import load_file, save_file

    from dreamomni2_jax.weights.store import ConversionError

    src = save_qwen3(tmp_path / "te", seed=3, tie_word_embeddings=False, max_shard_size="10MB")
    (f,) = src.glob("*.safetensors")
    sd = load_file(str(f))
    assert "lm_head.weight" in sd
    load_qwen3(src, dtype=jnp.float32)  # converted in memory; lm_head skipped
    sd["model.extra.weight"] = torch.zeros(2)
    del sd["model.layers.1.self_attn.k_norm.weight"]
    save_file(sd, str(f))
    with pytest.raises(ConversionError) as e:
        load_qwen3(src, dtype=jnp.float32)
    assert "extra.weight" in str(e.value) and "layers.1.self_attn.k_norm.weight" in str(e.value)


def test_unsupported_configs_are_refused():
    base = dict(model_type="qwen3", hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match="rope_type"):
        Qwen3Config.from_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="sliding"):
        Qwen3Config.from_dict({**base, "use_sliding_window": True})
    cfg = Qwen3Config.from_dict({**base, "rope_theta": 5.0})  # transformers 4 layout
    assert cfg.rope_theta == 5.0 and cfg.num_key_value_heads == 4 and cfg.head_dim == 8  # transformers' defaults


@pytest.mark.parametrize("name", ["klein-4b", "klein-9b"])
def test_klein_text_encoder_configs_match_transformers_at_full_size(name):
    """Qwen3-4B / Qwen3-8B (meta device): every tensor maps onto our model with the right shape."""
    from transformers import Qwen3Config as TorchQwen3Config
    from transformers import Qwen3Model as TorchQwen3

    from dreamomni2_jax.convert.qwen3 import make_plan
    from dreamomni2_jax.models.qwen3 import QWEN3_PRESETS

    cfg = QWEN3_PRESETS[name]
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type", "rope_theta")}
    with torch.device("meta"):
        ref = TorchQwen3(TorchQwen3Config(**d, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}))
    make_plan(meta_reader(ref), cfg)
