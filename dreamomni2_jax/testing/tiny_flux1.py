"""Tiny random Flux Kontext pipeline folders in the real diffusers on-disk layout.

Used by the test fixtures and by the demo in place of a model download (and of a dataset:
:func:`write_jsonl` / :func:`write_folder` draw small multi-reference samples). The components
are the real diffusers / transformers classes with tiny configs and seeded random weights,
written with ``save_pretrained`` (safetensors), so our converters and loaders run on the
exact formats a user's download has. Needs the ``ref`` extra (torch, diffusers,
transformers, sentencepiece); nothing on the runtime path imports this module.

    python -m dreamomni2_jax.testing.tiny_flux1 OUT_DIR [--seed 0] [--no-guidance]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from dreamomni2_jax.utils.atomic_write import atomic_dir

# Latent channels 4 -> packed transformer in_channels 16. Four VAE blocks -> scale factor 8.
VAE_TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

FLUX_TINY = dict(
    patch_size=1,
    in_channels=16,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

CLIP_TINY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    layer_norm_eps=1e-5,
)

T5_TINY = dict(
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
    use_cache=False,
)

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# Corpus for the tiny tokenizers: words the demo data and tests use.
_CORPUS = [
    "a photo of a cat", "make the bag have the same pattern as the dress",
    "a red ball on a blue table", "the dog runs in the park in the sun",
    "put the hat from image 2 on the person in image 1", "It is editing task.",
    "It is generation task.", "replace the object with the one in the second image",
    "a green square and a yellow circle", "draw the shapes of image 1 in the colors of image 2",
    "turn the background white", "make it look like a painting", "0 1 2 3 4 5 6 7 8 9",
]
T5_VOCAB_SIZE = 128  # >= tokenizer size; spare rows are normal in T5 checkpoints
CLIP_VOCAB_SIZE = 256


def _seed(seed: int):
    import torch

    torch.manual_seed(seed)


def _randomize(model, seed: int) -> None:
    """Give every parameter seeded random values of a moderate scale (norm weights near 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[1] if p.ndim > 1 else max(p.shape[0], 1)
                for d in p.shape[2:]:
                    fan_in *= d
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)


def flux_model(seed: int = 0, **kwargs):
    """The in-memory tiny Flux: our NNX ``FluxTransformer2DModel`` with :data:`FLUX_TINY`, float32 parameters and
    compute, random init from ``nnx.Rngs(seed)`` (``kwargs``: ``attention_impl``, ``remat``, ...)."""
    import jax.numpy as jnp
    from flax import nnx

    # deferred import: the tiny-model builders run without JAX until a JAX model is asked for
    from dreamomni2_jax.models.flux import FluxConfig, FluxTransformer2DModel

    return FluxTransformer2DModel(FluxConfig.from_dict(FLUX_TINY), rngs=nnx.Rngs(seed), dtype=jnp.float32,
                                  param_dtype=jnp.float32, **kwargs)


def save_random(build: Callable[[], Any], out_dir, seed: int, prepare: Callable[[Any], None] | None = None,
                **save_kwargs) -> Path:
    """Seed torch, ``build()`` a diffusers / transformers model, give it seeded random weights (then
    ``prepare(model)``, e.g. buffers) and ``save_pretrained`` it as safetensors (``save_kwargs``: shard size)."""
    _seed(seed)
    model = build()
    _randomize(model, seed)
    if prepare is not None:
        prepare(model)
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    return Path(out_dir)


def save_transformer(out_dir, seed: int = 0, max_shard_size: str = "200KB", **overrides) -> Path:
    """diffusers ``FluxTransformer2DModel`` with :data:`FLUX_TINY` (+ overrides), sharded safetensors."""
    from diffusers import FluxTransformer2DModel

    return save_random(lambda: FluxTransformer2DModel(**{**FLUX_TINY, **overrides}), out_dir, seed,
                       max_shard_size=max_shard_size)


def save_vae(out_dir, seed: int = 1) -> Path:
    from diffusers import AutoencoderKL

    return save_random(lambda: AutoencoderKL(**VAE_TINY), out_dir, seed)


def save_clip(out_dir, seed: int = 2, eos_token_id: int = 1) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1, **CLIP_TINY)
    return save_random(lambda: CLIPTextModel(cfg), out_dir, seed)


def save_t5(out_dir, seed: int = 3, max_shard_size: str = "100KB") -> Path:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=T5_VOCAB_SIZE, pad_token_id=0, eos_token_id=1, **T5_TINY)
    return save_random(lambda: T5EncoderModel(cfg), out_dir, seed, max_shard_size=max_shard_size)


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE vocab: specials, every byte symbol alone and word-final, and a few merges."""
    # GPT-2/CLIP byte alphabet: printable bytes map to themselves, first 94 are '!'..'~'.
    symbols = [chr(b) for b in range(ord("!"), ord("~") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols[:94]:  # printable ASCII range of the byte alphabet
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    merges = ["t h", "th e</w>", "a t</w>", "i n", "o n</w>", "e r", "a n", "th e", "i s</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    assert len(vocab) <= CLIP_VOCAB_SIZE, len(vocab)
    return vocab, merges


def save_tokenizers(clip_dir, t5_dir) -> tuple[Path, Path]:
    """CLIP BPE tokenizer (vocab.json + merges.txt) and a T5 unigram tokenizer trained offline."""
    import sentencepiece as spm
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_dir, t5_dir = Path(clip_dir), Path(t5_dir)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = _clip_vocab()
        # Pass the vocab itself: like T5's, CLIPTokenizer(vocab_file=...) is silently ignored in transformers 5.
        clip = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
        clip.model_max_length = 77
        assert clip("the cat").input_ids == [0, vocab["the</w>"], vocab["c"], vocab["at</w>"], 1], "CLIP vocab not used"
        clip.save_pretrained(clip_dir)

        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_CORPUS * 10))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "spiece"), vocab_size=100, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "spiece.model"))
        # Build from the (piece, score) list: T5TokenizerFast(vocab_file=...) silently ignores the file.
        pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        t5 = T5TokenizerFast(vocab=pieces, extra_ids=0)
        t5.model_max_length = 512
        assert len(t5) <= T5_VOCAB_SIZE and t5("a photo of a cat").input_ids[:-1] == sp.encode("a photo of a cat")
        t5.save_pretrained(t5_dir)
    return clip_dir, t5_dir


def save_scheduler(out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scheduler_config.json").write_text(json.dumps({**SCHEDULER_CONFIG, "_diffusers_version": "0.42.1"}, indent=2))
    return out


MODEL_INDEX = {
    "_class_name": "FluxKontextPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_pipeline(root, seed: int = 0, guidance_embeds: bool = True, **transformer_overrides) -> Path:
    """Write a complete tiny Flux Kontext pipeline folder at ``root`` (atomically) and return it."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists")
    with atomic_dir(root) as tmp:
        save_transformer(tmp / "transformer", seed, guidance_embeds=guidance_embeds, **transformer_overrides)
        save_vae(tmp / "vae", seed + 1)
        save_clip(tmp / "text_encoder", seed + 2)
        save_t5(tmp / "text_encoder_2", seed + 3)
        save_tokenizers(tmp / "tokenizer", tmp / "tokenizer_2")
        save_scheduler(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root


# --------------------------------------------------------------------------- tiny datasets
# Drawn shapes (PIL): 1, 2 and 3 references of different sizes, in both input formats.

INSTRUCTIONS = [
    "put the hat from image 2 on the person in image 1",
    "make the bag have the same pattern as the dress",
    "a red ball on a blue table",
    "replace the object with the one in the second image",
    "a green square and a yellow circle",
    "turn the background white",
    "make it look like a painting",
    "draw the shapes of image 1 in the colors of image 2",
]

# Editing records (the default task): the first reference (source) has its target's aspect ratio.
SPECS: list[tuple[tuple[int, int], list[tuple[int, int]]]] = [
    ((96, 96), [(96, 96)]),
    ((128, 96), [(128, 96), (64, 112)]),
    ((96, 96), [(96, 96)]),
    ((96, 128), [(96, 128), (128, 64), (64, 64)]),
    ((128, 96), [(128, 96), (64, 112)]),
    ((96, 96), [(96, 96)]),
]


def draw_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A few random rectangles / ellipses on a random background (RGB PNG / JPEG by extension)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_jsonl(root, specs=SPECS, name: str = "train.jsonl", seed: int = 0) -> Path:
    """``root/name`` manifest with images under ``root/img/`` (relative paths)."""
    root = Path(root)
    lines = []
    for i, (tsize, rsizes) in enumerate(specs):
        target = draw_image(root / "img" / f"s{i}_target.png", tsize, seed * 1000 + 10 * i)
        refs = [draw_image(root / "img" / f"s{i}_ref{j}.png", r, seed * 1000 + 10 * i + 1 + j)
                for j, r in enumerate(rsizes)]
        lines.append(json.dumps({"instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)],
                                 "target": str(target.relative_to(root)),
                                 "references": [str(r.relative_to(root)) for r in refs]}))
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_folder(root, specs=SPECS, seed: int = 0) -> Path:
    """qflux-style folder: ``sI.png``, ``sI.txt``, ``sI_control.png``, ``sI_control_1.png``, ..."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, (tsize, rsizes) in enumerate(specs):
        draw_image(root / f"s{i}.png", tsize, seed * 1000 + 10 * i)
        (root / f"s{i}.txt").write_text(INSTRUCTIONS[i % len(INSTRUCTIONS)] + "\n")
        for j, r in enumerate(rsizes):
            suffix = "_control" if j == 0 else f"_control_{j}"
            draw_image(root / f"s{i}{suffix}.png", r, seed * 1000 + 10 * i + 1 + j)
    return root



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-guidance", action="store_true", help="transformer without guidance embedding")
    args = ap.parse_args(argv)
    path = build_pipeline(args.out, args.seed, guidance_embeds=not args.no_guidance)
    print(f"tiny Flux Kontext pipeline written to {path}")


if __name__ == "__main__":
    main()
