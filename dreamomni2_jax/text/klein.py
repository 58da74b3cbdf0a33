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
from dreamomni2_jax.convert.loaders import load_qwen3


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
    (text ids: :func:`dreamomni2_jax.layout.ids_klein.text_ids`)."""
    ids, mask = tokenize(tokenizer, prompts, max_sequence_length)
    return _embeds(model, ids, mask, tuple(int(i) for i in layers))


def out_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """Hidden-state layers the klein pipeline concatenates: ``(9, 18, 27)`` of the 36 layers of Qwen3-4B / 8B
    (``text_encoder_out_layers``), i.e. a quarter, half and three quarters of the depth; the same fractions for
    other depths (the tiny test encoder's 4 layers give ``(1, 2, 3)``)."""
    n = int(num_hidden_layers)
    if n < 4:
        raise ValueError(f"a klein text encoder needs >= 4 layers, got {n}")
    return (n // 4, n // 2, 3 * n // 4)


class KleinText:
    """The klein text side with the interface of :class:`dreamomni2_jax.text.flux1.TextEncoders`: ``encode_prompt``
    returns ``(prompt_embeds [B, L, 3 * hidden], pooled [B, 0])`` (FLUX.2 has no pooled embedding)."""

    def __init__(self, model: Qwen3Model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.layers = out_layers(model.config.num_hidden_layers)

    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512):
        import jax.numpy as jnp

        embeds = encode_prompt(self.model, self.tokenizer, prompts, max_sequence_length, self.layers)
        return embeds, jnp.zeros((embeds.shape[0], 0), embeds.dtype)


def load_klein_text(root: str | Path, dtype=None, param_sharding=None) -> KleinText:
    """Qwen3 ``text_encoder/`` + ``tokenizer/`` of a converted (or diffusers) klein folder."""
    import jax.numpy as jnp

    root = Path(root)
    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub}: klein text encoder / tokenizer folder missing")
    model = load_qwen3(root / "text_encoder", jnp.bfloat16 if dtype is None else dtype, param_sharding=param_sharding)
    return KleinText(model, load_tokenizer(root / "tokenizer"))
