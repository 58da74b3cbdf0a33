"""Cache / data fixtures over the tiny drawn-shape datasets of :mod:`dreamomni2_jax.testing.tiny_flux1`.

``SPECS`` lists (target (w, h), [reference (w, h), ...]) pixel sizes: 1, 2 and 3 references of
different sizes and aspect ratios. Images are seeded, so every call writes identical files.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dreamomni2_jax.config import Config, DataConfig, ModelConfig
from dreamomni2_jax.testing.tiny_flux1 import INSTRUCTIONS, SPECS, draw_image, write_folder, write_jsonl  # noqa: F401


def tiny_config(model_path="", cache_dir="", **data) -> Config:
    """fp32 tiny config: 96x96 target budget, references scaled the same, T5 length 32."""
    kw = dict(cache_dir=str(cache_dir), batch_size=2, max_refs=3, target_max_area=96 * 96,
              reference_max_area=96 * 96, min_image_size=32,
              batching="bucket", num_workers=0, max_sequence_length=32, synthetic_resolution=(96, 64),
              synthetic_refs=((64, 64), (96, 96)))
    kw.update(data)
    return Config(model=ModelConfig(path=str(model_path), param_dtype="float32", compute_dtype="float32"),
                  data=DataConfig(**kw))


def with_data(cfg: Config, **data) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


@pytest.fixture(scope="session")
def tiny_converted_dir(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline converted with convert/pipeline.py (fp32 everywhere)."""
    from dreamomni2_jax.convert.pipeline import convert_pipeline

    return convert_pipeline(tiny_pipeline_dir, tmp_path_factory.mktemp("conv") / "model", dtype="fp32",
                            small_dtype="fp32", progress=False)


@pytest.fixture(scope="session")
def tiny_encoders(tiny_converted_dir):
    """Real tiny VAE + CLIP/T5 behind the cache's Encoders interface."""
    from dreamomni2_jax.cache.encoders import JaxEncoders

    return JaxEncoders(tiny_converted_dir, "float32", max_sequence_length=32, image_batch=4, text_batch=4)


@pytest.fixture(scope="session")
def tiny_cache(tiny_converted_dir, tiny_encoders, tmp_path_factory):
    """(config, inputs dir, cache dir) for SPECS cached from a JSONL manifest in shards of 4 records."""
    from dreamomni2_jax.cache.stage import build_cache

    root = tmp_path_factory.mktemp("data")
    manifest = write_jsonl(root / "in")
    cfg = tiny_config(tiny_converted_dir, root / "cache")
    build_cache(cfg, manifest, root / "cache", tiny_encoders, shard_size=4, progress=False)
    return cfg, manifest, root / "cache"


# --------------------------------------------------------------------------- tiny Qwen2.5-VL (enhancer tests)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_vocab() -> dict[str, int]:
    """GPT-2 byte-level alphabet (bytes_to_unicode), one token per byte, then the Qwen special tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    vocab.update({t: 256 + i for i, t in enumerate(QWEN_SPECIALS)})
    return vocab


def save_tiny_qwen_vl(out: Path, seed: int = 0) -> Path:
    """Random tiny Qwen2.5-VL (model, byte-level tokenizer, image processor, chat template) via save_pretrained."""
    import torch
    from tokenizers import AddedToken
    from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2Tokenizer, Qwen2VLImageProcessor)

    vocab = _byte_vocab()
    ids = {t: vocab[t] for t in QWEN_SPECIALS}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True) for t in QWEN_SPECIALS])
    improc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # printable answers of a fixed minimum length from the random model
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                               min_new_tokens=6, bad_words_ids=[[i] for i in ids.values()])
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    return out


def reference_qwen_processor(path: Path):
    """transformers' ``Qwen2_5_VLProcessor`` for images, built without a video processor (which needs
    torchvision, absent here): the reference our enhancer's input assembly is compared with."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    tok = AutoTokenizer.from_pretrained(path)
    proc = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    proc.tokenizer, proc.image_processor, proc.chat_template = tok, AutoImageProcessor.from_pretrained(path), \
        tok.chat_template
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tok.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tok.convert_tokens_to_ids(proc.video_token)
    return proc
