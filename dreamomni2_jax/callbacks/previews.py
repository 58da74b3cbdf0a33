"""Held-out records in the validation grid (``sample.eval_records`` > 0 with ``data.eval_cache_dir``).

The first ``sample.eval_records`` records of the held-out cache are previewed next to the ``sample.validation``
entries: their instruction as the caption, their references and target decoded from the cached latents with the
VAE, and a sample generated from the cached prompt embeddings and the decoded references at the target's size, so
a row reads ``references | sample | target``. Nothing but the cache is needed (the source images may live
elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dreamomni2_jax.data import stream as data
from dreamomni2_jax.cache.records import CacheError, decode_record, load_index
from dreamomni2_jax.models.vae import decode_latents, denormalize_latents

__all__ = ["EvalRecord", "read_eval_records", "decode_latent"]


@dataclass(frozen=True)
class EvalRecord:
    """One held-out record: normalised latents ``[h, w, C]`` and the prompt embeddings, as cached."""

    prompt: str
    task: str
    t5: np.ndarray  # [L, D]
    pooled: np.ndarray  # [Dp]
    references: tuple[np.ndarray, ...]
    target: np.ndarray
    where: str  # the record's input line, for messages


def read_eval_records(cache_dir: str | Path, n: int, max_sequence_length: int) -> list[EvalRecord]:
    """The first ``n`` records (index order) of the cache at ``cache_dir``; all of them when it holds fewer.

    Raises :class:`dreamomni2_jax.cache.records.CacheError` for a cache whose prompt embeddings have another length than
    ``data.max_sequence_length`` (they could not be batched with the other validation prompts)."""
    from array_record.python.array_record_module import ArrayRecordReader

    root = Path(cache_dir)
    index = load_index(root)
    out: list[EvalRecord] = []
    for s in index["shards"]:
        if len(out) >= n:
            break
        data.check_shard(root / s["file"], s.get("num_records"))
        reader = ArrayRecordReader(str(root / s["file"]))
        try:
            rows = reader.read(list(range(min(s["num_records"], n - len(out)))))
        finally:
            reader.close()
        for raw in rows:
            arrays, meta = decode_record(bytes(raw))
            refs = tuple(np.array(arrays[f"ref{j}"]) for j in range(len(arrays)) if f"ref{j}" in arrays)
            where = str(meta.get("where") or meta.get("line") or f"{root} record {len(out)}")
            if arrays["text"].shape[0] != max_sequence_length:
                raise CacheError(f"data.eval_cache_dir {root}: prompt embeddings of length {arrays['text'].shape[0]}"
                                 f" != data.max_sequence_length={max_sequence_length} ({where})")
            out.append(EvalRecord(str(meta.get("instruction", "")), str(meta.get("task") or "editing"),
                                  np.array(arrays["text"]), np.array(arrays["pooled"]), refs,
                                  np.array(arrays["target"]), where))
    return out


def decode_latent(vae, z: np.ndarray) -> np.ndarray:
    """Normalised latent ``[h, w, C]`` (as cached) -> uint8 ``[h * f, w * f, 3]`` through the VAE decoder."""
    import jax.numpy as jnp

    x = denormalize_latents(jnp.asarray(z, jnp.float32)[None], vae.config).astype(vae.dtype)
    img = np.clip(np.asarray(decode_latents(vae, x), np.float32)[0] / 2 + 0.5, 0.0, 1.0)
    return (img * 255).round().astype(np.uint8)  # as sampler.to_uint8
