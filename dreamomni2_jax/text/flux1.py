"""Prompt encoding for Flux: CLIP pooled vector + T5 sequence, tokenized as diffusers' ``FluxPipeline``.

``FluxPipeline.encode_prompt`` semantics: CLIP gets ``padding="max_length"`` to the CLIP tokenizer's
``model_max_length`` (77) with truncation and no attention mask, and only its pooled output is
used; T5 gets ``padding="max_length"`` to ``max_sequence_length`` (512) with truncation and no
attention mask. Tokenizers are the transformers classes loaded from the local ``tokenizer/`` and
``tokenizer_2/`` folders (``return_tensors="np"``; no torch).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamomni2_jax.models.clip import CLIPTextModel
from dreamomni2_jax.convert.loaders import load_clip
from dreamomni2_jax.models.t5 import T5EncoderModel
from dreamomni2_jax.convert.loaders import load_t5

log = logging.getLogger(__name__)


@nnx.jit
def _clip_pooled(clip: CLIPTextModel, ids):
    return clip(ids)[1]


@nnx.jit
def _t5_embeds(t5: T5EncoderModel, ids):
    return t5(ids)


def _tokenize(tok, prompts: list[str], max_length: int, what: str) -> np.ndarray:
    ids = tok(prompts, padding="max_length", max_length=max_length, truncation=True,
              return_tensors="np").input_ids
    longest = tok(prompts, padding="longest", return_tensors="np").input_ids
    if longest.shape[-1] > ids.shape[-1]:
        cut = [t[:200] for t in tok.batch_decode(longest[:, max_length - 1:-1], skip_special_tokens=True) if t]
        log.warning("%s: prompt(s) truncated to %d tokens; dropped: %s", what, max_length, cut)
    return ids.astype(np.int32)


@dataclasses.dataclass
class TextEncoders:
    """CLIP-L + T5-XXL encoders with their tokenizers (``tokenizer``: CLIP, ``tokenizer_2``: T5)."""

    clip: CLIPTextModel
    t5: T5EncoderModel
    tokenizer: Any
    tokenizer_2: Any

    @property
    def clip_max_length(self) -> int:
        n = int(self.tokenizer.model_max_length)
        limit = self.clip.config.max_position_embeddings
        if n > limit:
            raise ValueError(f"CLIP tokenizer model_max_length={n} exceeds the text encoder's "
                             f"max_position_embeddings={limit}")
        return n

    def tokenize(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """``(clip_ids [B, 77], t5_ids [B, max_sequence_length])`` int32, as FluxPipeline tokenizes."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"encode_prompt: prompts must be a non-empty list of str, got {prompts!r}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        clip_ids = _tokenize(self.tokenizer, prompts, self.clip_max_length, "CLIP")
        t5_ids = _tokenize(self.tokenizer_2, prompts, max_sequence_length, "T5")
        return clip_ids, t5_ids

    def encode_prompt(self, prompts: str | Sequence[str],
                      max_sequence_length: int = 512) -> tuple[jax.Array, jax.Array]:
        """``(t5_embeds [B, max_sequence_length, d_t5], pooled [B, d_clip])`` in the encoders' dtypes."""
        clip_ids, t5_ids = self.tokenize(prompts, max_sequence_length)
        pooled = _clip_pooled(self.clip, jnp.asarray(clip_ids))
        embeds = _t5_embeds(self.t5, jnp.asarray(t5_ids))
        return embeds, pooled


def load_tokenizers(root: str | Path) -> tuple[Any, Any]:
    """``(CLIPTokenizer, T5TokenizerFast)`` from ``root/tokenizer`` and ``root/tokenizer_2``."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    root = Path(root)
    for sub in ("tokenizer", "tokenizer_2"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub}: tokenizer folder missing")
    return (CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
            T5TokenizerFast.from_pretrained(str(root / "tokenizer_2")))


def load_text_encoders(converted_dir: str | Path, dtype=jnp.bfloat16, param_sharding=None) -> TextEncoders:
    """Load ``text_encoder/`` (CLIP), ``text_encoder_2/`` (T5) and both tokenizers.

    ``converted_dir``: a ``convert/pipeline.py`` output, or a diffusers Flux folder (converted on the fly).
    """
    root = Path(converted_dir)
    for sub in ("text_encoder", "text_encoder_2"):
        if not (root / sub / "config.json").is_file():
            raise FileNotFoundError(f"{root / sub}: text encoder folder (with config.json) missing")
    tok, tok2 = load_tokenizers(root)
    clip = load_clip(root / "text_encoder", dtype, param_sharding=param_sharding)
    t5 = load_t5(root / "text_encoder_2", dtype, param_sharding=param_sharding)
    return TextEncoders(clip=clip, t5=t5, tokenizer=tok, tokenizer_2=tok2)
