"""encode_prompt against diffusers FluxPipeline.encode_prompt; tokenizers really use the fixture vocabularies."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from support.asserts import assert_close
from dreamomni2_jax.text.flux1 import load_text_encoders

LONG = "the dog runs in the park in the sun " * 40
PROMPTS = ["a photo of a cat", "", LONG]


@pytest.fixture(scope="module")
def encoders(tiny_pipeline_dir):
    return load_text_encoders(tiny_pipeline_dir, jnp.float32)  # diffusers folder, converted on the fly


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)


@pytest.mark.parametrize("max_sequence_length", [512, 16])
def test_encode_prompt_matches_diffusers(encoders, pipe, max_sequence_length):
    # The long prompt really is truncated by both tokenizers.
    assert len(encoders.tokenizer(LONG).input_ids) > 77
    assert len(encoders.tokenizer_2(LONG).input_ids) > max_sequence_length
    with torch.no_grad():
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=max_sequence_length)
    embeds, pooled = encoders.encode_prompt(PROMPTS, max_sequence_length=max_sequence_length)
    assert embeds.shape == (3, max_sequence_length, 32) and pooled.shape == (3, 32)
    assert_close(embeds, ref_embeds.numpy(), 1e-4)
    assert_close(pooled, ref_pooled.numpy(), 1e-4)


def test_tokenize_matches_pipeline_tokenization(encoders, pipe):
    clip_ids, t5_ids = encoders.tokenize("a photo of a cat", max_sequence_length=16)
    ref_clip = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, truncation=True).input_ids
    ref_t5 = pipe.tokenizer_2(["a photo of a cat"], padding="max_length", max_length=16, truncation=True).input_ids
    assert clip_ids.dtype == np.int32 and clip_ids.tolist() == ref_clip and t5_ids.tolist() == ref_t5
    with pytest.raises(ValueError, match="non-empty list of str"):
        encoders.tokenize([])
    with pytest.raises(ValueError, match="non-empty list of str"):
        encoders.encode_prompt(["ok", 3])


def test_tokenizers_use_fixture_vocabulary(encoders, tiny_pipeline_dir):
    """The T5 tokenizer must use tokenizer_2/tokenizer.json's unigram vocab, not a default or empty one."""
    from tokenizers import Tokenizer

    text = "the dog runs in the park"
    for tok, sub in ((encoders.tokenizer_2, "tokenizer_2"), (encoders.tokenizer, "tokenizer")):
        raw = Tokenizer.from_file(str(tiny_pipeline_dir / sub / "tokenizer.json"))
        assert tok(text).input_ids == raw.encode(text).ids
        assert len(tok) == raw.get_vocab_size()
    t5 = encoders.tokenizer_2
    ids = t5(text).input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    vocab = [piece for piece, _ in json.loads((tiny_pipeline_dir / "tokenizer_2" / "tokenizer.json").read_text())
             ["model"]["vocab"]]
    assert [vocab[i] for i in t5("a cat").input_ids[:-1]] == t5.convert_ids_to_tokens(t5("a cat").input_ids[:-1])
    assert t5("a").input_ids[0] == vocab.index("\u2581a")
    assert t5.unk_token_id in t5("\u03a9").input_ids  # out-of-vocabulary really maps to <unk>
