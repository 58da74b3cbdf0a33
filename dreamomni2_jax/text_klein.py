"""Prompt encoding for FLUX.2 [klein]: Qwen3 hidden states of several layers, tokenized as diffusers'
``Flux2KleinPipeline._get_qwen3_prompt_embeds`` does.

Each prompt is rendered with the tokenizer's chat template (one user turn, ``add_generation_prompt=True``,
``enable_thinking=False``), then tokenized with ``padding="max_length"`` to ``max_sequence_length`` (512) and
truncation; the attention mask goes to the encoder (causal + padding) and the padded positions' embeddings are
kept (the transformer sees all ``max_sequence_length`` tokens, as in the pipeline). The tokenizer is the transformers
class loaded from the local ``tokenizer/`` folder (``return_tensors="np"``; no torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from flax import nnx

from dreamomni2_jax.models.qwen3 import KLEIN_LAYERS, Qwen3Model, prompt_embeds


def load_tokenizer(folder: str | Path) -> Any:
    """The Qwen2 tokenizer of a klein pipeline (``tokenizer/`` of a source or converted folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, prompts: str | Sequence[str], max_sequence_length: int = 512
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int32 ``[B, max_sequence_length]`` each, as the klein pipeline builds them."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, masks = [], []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        enc = tokenizer(text, return_tensors="np", padding="max_length", truncation=True,
                        max_length=max_sequence_length)
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
    return np.concatenate(ids).astype(np.int32), np.concatenate(masks).astype(np.int32)


@nnx.jit(static_argnames=("layers",))
def _embeds(model: Qwen3Model, ids, mask, layers):
    return prompt_embeds(model, ids, mask, layers)


def encode_prompt(model: Qwen3Model, tokenizer, prompts: str | Sequence[str], max_sequence_length: int = 512,
                  layers: Sequence[int] = KLEIN_LAYERS):
    """``Flux2KleinPipeline.encode_prompt`` prompt embeddings ``[B, max_sequence_length, len(layers) * hidden]``
    (text ids: :func:`dreamomni2_jax.positions_flux2.text_ids`)."""
    ids, mask = tokenize(tokenizer, prompts, max_sequence_length)
    return _embeds(model, ids, mask, tuple(int(i) for i in layers))
