"""Tiny random FLUX.2 [klein] components in the real diffusers / transformers on-disk layout.

The counterpart of :mod:`dreamomni2_jax.testing.tiny_flux1` for the second backbone: the real ``Flux2Transformer2DModel``,
``AutoencoderKLFlux2`` and ``Qwen3ForCausalLM`` classes with tiny configs and seeded random weights, written with
``save_pretrained`` (safetensors), so our converters and models are tested on the formats a user's download has.
Needs the ``ref`` extra (torch, diffusers, transformers); nothing on the runtime path imports this module.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from dreamomni2_jax.utils.atomic_write import atomic_dir
from dreamomni2_jax.testing.tiny_flux1 import VAE_TINY, save_random, save_scheduler

# klein-shaped: no guidance embedder, 4 rope axes summing to head_dim, joint_attention_dim = 3 x Qwen3 hidden.
FLUX2_TINY = dict(
    patch_size=1,
    in_channels=16,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=96,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    guidance_embeds=False,
)

# FLUX.1's tiny VAE blocks (latent channels 4 -> patchified 16 = FLUX2_TINY in_channels; scale factor 8) with
# quant convs and batch-norm latent statistics instead of scaling / shift factors.
VAE2_TINY = {**{k: v for k, v in VAE_TINY.items() if k not in ("scaling_factor", "shift_factor")},
             "use_quant_conv": True, "use_post_quant_conv": True}

QWEN3_TINY = dict(
    vocab_size=320,  # >= the tiny tokenizer (256 byte symbols + specials + merges)
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    pad_token_id=256,  # <|endoftext|>, the Qwen pad token
)
# Hidden-state layers the pipeline concatenates (klein uses (9, 18, 27) of 36); 3 x 32 = FLUX2_TINY joint dim.
QWEN3_TINY_LAYERS = (1, 2, 3)


def save_flux2_transformer(out_dir, seed: int = 0, max_shard_size: str = "200KB", **overrides) -> Path:
    """diffusers ``Flux2Transformer2DModel`` with :data:`FLUX2_TINY` (+ overrides), sharded safetensors."""
    from diffusers import Flux2Transformer2DModel

    return save_random(lambda: Flux2Transformer2DModel(**{**FLUX2_TINY, **overrides}), out_dir, seed,
                       max_shard_size=max_shard_size)


def save_flux2_vae(out_dir, seed: int = 1, **overrides) -> Path:
    """diffusers ``AutoencoderKLFlux2`` with :data:`VAE2_TINY`; random batch-norm running statistics."""
    import torch
    from diffusers import AutoencoderKLFlux2

    def batch_norm_stats(vae):
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=gen))
            vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))

    return save_random(lambda: AutoencoderKLFlux2(**{**VAE2_TINY, **overrides}), out_dir, seed,
                       prepare=batch_norm_stats)


def save_qwen3(out_dir, seed: int = 2, max_shard_size: str = "100KB", **overrides) -> Path:
    """transformers ``Qwen3ForCausalLM`` (the klein pipeline's ``text_encoder`` class) with :data:`QWEN3_TINY`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return save_random(lambda: Qwen3ForCausalLM(Qwen3Config(**{**QWEN3_TINY, **overrides})), out_dir, seed,
                       max_shard_size=max_shard_size)


# Qwen3's chat template reduced to what the klein pipeline renders (one user turn, generation prompt, thinking off).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_MERGES = ("t h", "th e", "Ġ a", "i n", "o n", "e r", "a n", "Ġ th", "Ġth e", "a t", "i s")


def _byte_symbols() -> list[str]:
    """GPT-2 / Qwen byte-level alphabet: the unicode symbol of each of the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def save_qwen2_tokenizer(out_dir) -> Path:
    """Byte-level BPE ``Qwen2TokenizerFast`` (every byte + a few merges), Qwen specials and chat template."""
    from transformers import Qwen2TokenizerFast

    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    for t in _SPECIALS:
        vocab[t] = len(vocab)
    for m in _MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    assert len(vocab) <= QWEN3_TINY["vocab_size"], len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[tuple(m.split()) for m in _MERGES], unk_token=None,
                             eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             additional_special_tokens=list(_SPECIALS[1:]))
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 512
    assert tok.pad_token_id == QWEN3_TINY["pad_token_id"]
    assert tok("<|im_start|>the")["input_ids"] == [vocab["<|im_start|>"], vocab["the"]], "tokenizer vocab not used"
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def build_klein_pipeline(root, seed: int = 0, **transformer_overrides) -> Path:
    """Write a complete tiny ``Flux2KleinPipeline`` folder at ``root`` (atomically, with diffusers'
    ``save_pretrained``: its ``model_index.json`` and component layout) and return it."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists")
    parts = root.with_name(root.name + ".parts")
    shutil.rmtree(parts, ignore_errors=True)
    save_flux2_transformer(parts / "transformer", seed, **transformer_overrides)
    save_flux2_vae(parts / "vae", seed + 1)
    save_qwen3(parts / "text_encoder", seed + 2)
    save_qwen2_tokenizer(parts / "tokenizer")
    save_scheduler(parts / "scheduler")
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(parts / "scheduler"),
        vae=AutoencoderKLFlux2.from_pretrained(parts / "vae"),
        text_encoder=Qwen3ForCausalLM.from_pretrained(parts / "text_encoder"),
        tokenizer=Qwen2TokenizerFast.from_pretrained(parts / "tokenizer"),
        transformer=Flux2Transformer2DModel.from_pretrained(parts / "transformer"))
    with atomic_dir(root) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="200KB")
        shutil.rmtree(parts)
        index = json.loads((tmp / "model_index.json").read_text())
        assert index["_class_name"] == "Flux2KleinPipeline", index
    return root


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write a tiny random Flux2KleinPipeline folder (diffusers layout)")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build_klein_pipeline(args.out, args.seed)
    print(f"tiny FLUX.2 [klein] pipeline written to {path}")


if __name__ == "__main__":
    main()
