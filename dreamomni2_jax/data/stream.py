"""Training batches: a Grain stream over the cache (``scripts/cache.py`` output), or synthetic batches.

Entry point for ``scripts/train.py``::

    stream = make_train_stream(cfg, jax.process_index(), jax.process_count())
    t5_empty, pooled_empty = stream.empty_prompt      # caption dropout, once
    batch = next(stream)                              # dict of numpy arrays, this process's share
    state = stream.get_state()                        # JSON-able; save with the checkpoint
    stream.set_state(state)                           # resume: the next batch is the one after `state`

Batch (batch-first numpy; ``B = data.batch_size // process_count``; ``4C`` = packed latent width):

* ``target`` [B, T, 4C] packed clean target latents (:func:`positions.pack_latents`);
* ``references`` [B, R, 4C] every reference's packed tokens, concatenated in order;
* ``img_ids`` int32 [B, T + R, 3] and ``img_mask`` bool [B, T + R]: :func:`positions.batch_layout`
  with ``model.position_scheme`` (target section first, then references; padding has id 0, mask False);
* ``t5`` [B, L, D], ``pooled`` [B, Dp] cached prompt embeddings;
* ``loss_weight`` float32 [B, T] per-token loss weights, only with ``train.loss_mask`` != "none"
  (:mod:`dreamomni2_jax.data.loss_mask`; padding 0).

``data.reference_dropout`` drops references per sample before assembly (:mod:`dreamomni2_jax.data.ref_dropout`).

Batch plan (identical on every process, so all processes see the same shapes at every step):
each epoch the records are shuffled with ``(data.shuffle_seed, epoch)`` and cut into global
batches of ``data.batch_size``; process ``p`` of ``n`` takes rows ``[p*B, (p+1)*B)`` of each global
batch. ``data.batching="bucket"``: a global batch holds records of one shape bucket (same target
and reference latent sizes; no padding); batches of all buckets are then shuffled. ``"pad"``: any
records; T and R are padded to the global batch's maxima rounded up to
``data.pad_multiple`` tokens (default 1; e.g. 256 bounds the number of compiled shapes). A
bucket (or the dataset) whose size is not a multiple of the batch size has its last batch
completed with records from the start of its own shuffled order, so an epoch may repeat a few
records; nothing is dropped. The stream is endless (epoch after epoch); batch ``k`` is a pure
function of ``(seed, k)``, which makes the iterator state just the step counter.

Grain does the reading: ``MapDataset.range(step, ...).map(load batch)`` with ``data.num_workers``
worker processes (``mp_prefetch``) or, with 0 workers, reader threads in-process.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dreamomni2_jax.data import loss_mask, ref_dropout
from dreamomni2_jax.layout import ids_flux1 as positions
from dreamomni2_jax.cache.records import CacheError, decode_record, load_index, round_up
from dreamomni2_jax.utils.dtypes import np_dtype
from dreamomni2_jax import families

LatentKey = tuple[tuple[int, int], tuple[tuple[int, int], ...]]
_ENDLESS = sys.maxsize // 2


def _local_batch(cfg, process_count: int) -> int:
    b = cfg.data.batch_size
    if process_count < 1 or b % process_count:
        raise ValueError(f"data.batch_size={b} is not divisible by the process count {process_count}")
    return b // process_count


# --------------------------------------------------------------------------- batch plan


class BatchPlan:
    """Which records form global batch ``step`` (deterministic in ``seed``; see the module docstring)."""

    def __init__(self, keys: Sequence[LatentKey], batch_size: int, batching: str, seed: int):
        if not keys:
            raise ValueError("BatchPlan needs at least one record")
        self.batch_size, self.batching, self.seed = batch_size, batching, seed
        if batching == "bucket":
            groups: dict[LatentKey, list[int]] = {}
            for i, k in enumerate(keys):
                groups.setdefault(k, []).append(i)
            self.groups = [np.asarray(groups[k]) for k in sorted(groups)]
        elif batching == "pad":
            self.groups = [np.arange(len(keys))]
        else:
            raise ValueError(f"data.batching={batching!r} is not 'bucket' or 'pad'")
        self.steps_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)
        self._cache: dict[int, np.ndarray] = {}  # epoch -> batches; replaced whole (safe for reader threads)

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        batches = self._cache.get(epoch)
        if batches is None:
            rng = np.random.default_rng([self.seed, epoch])
            parts = []
            for g in self.groups:
                perm = g[rng.permutation(len(g))]
                n = math.ceil(len(g) / self.batch_size) * self.batch_size
                full = np.resize(perm, n)  # wraps around: completes the last batch from the start
                parts.append(full.reshape(-1, self.batch_size))
            parts = np.concatenate(parts)
            batches = parts[rng.permutation(len(parts))]
            self._cache = {**{k: v for k, v in self._cache.items() if abs(k - epoch) <= 1}, epoch: batches}
        return batches

    def global_batch(self, step: int) -> np.ndarray:
        """Record indices of global batch ``step`` (int64 [batch_size])."""
        epoch, k = divmod(int(step), self.steps_per_epoch)
        return self._epoch_batches(epoch)[k]


# --------------------------------------------------------------------------- batch assembly


def assemble_batch(samples: Sequence[dict[str, np.ndarray]], scheme: str, target_len: int | None = None,
                   reference_len: int | None = None,
                   weights: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Records (``target`` [h, w, C], ``ref0``.. latents, ``t5``, ``pooled``) -> a padded batch dict; ``weights``
    (per-token loss weights of each sample) adds ``loss_weight`` [B, T] (padding 0)."""
    layouts, packed_t, packed_r = [], [], []
    for s in samples:
        refs = [s[f"ref{j}"] for j in range(sum(k.startswith("ref") and k[3:].isdigit() for k in s))]
        layouts.append(positions.SampleLayout(tuple(s["target"].shape[:2]), tuple(tuple(r.shape[:2]) for r in refs)))
        packed_t.append(positions.pack_latents(s["target"][None])[0])
        packed_r.append([positions.pack_latents(r[None])[0] for r in refs])
    lay = positions.batch_layout(layouts, scheme, target_len, reference_len)
    b, width, dtype = len(samples), packed_t[0].shape[-1], packed_t[0].dtype
    target = np.zeros((b, lay.target_len, width), dtype)
    references = np.zeros((b, lay.reference_len, width), dtype)
    for i, (t, rs) in enumerate(zip(packed_t, packed_r)):
        target[i, : len(t)] = t
        if rs:
            r = np.concatenate(rs)
            references[i, : len(r)] = r
    out = {
        "target": target, "references": references, "img_ids": lay.ids, "img_mask": lay.mask,
        "text": np.stack([s["text"] for s in samples]), "pooled": np.stack([s["pooled"] for s in samples]),
    }
    if weights is not None:
        lw = np.zeros((b, lay.target_len), np.float32)
        for i, w in enumerate(weights):
            lw[i, : len(w)] = w
        out["loss_weight"] = lw
    return out


@dataclass(frozen=True)
class SampleOptions:
    """Per-sample processing of the loader: reference dropout and loss-mask weights (from the config)."""

    reference_dropout: float = 0.0
    seed: int = 0
    loss_mask: str = "none"
    mask_threshold: float = 0.1
    mask_dilate: int = 1

    @classmethod
    def from_config(cls, cfg) -> "SampleOptions":
        t = cfg.train
        return cls(cfg.data.reference_dropout, cfg.data.shuffle_seed, t.loss_mask, t.mask_threshold, t.mask_dilate)


def process_samples(records: Sequence[tuple[dict, dict]], first_index: int, opts: SampleOptions,
                    scheme: str, target_len: int | None, reference_len: int | None) -> dict[str, np.ndarray]:
    """Decoded records ``(arrays, meta)`` of global sample indices ``first_index, first_index + 1, ...`` -> batch:
    loss weights from the full record, then reference dropout, then :func:`assemble_batch`. With dropout the
    reference section keeps its undropped length (same shapes at every step)."""
    weights = None
    if opts.loss_mask != "none":
        weights = [loss_mask.sample_weights(a, m, opts.loss_mask, opts.mask_threshold, opts.mask_dilate)
                   for a, m in records]
    samples = [a for a, _ in records]
    if opts.reference_dropout > 0:
        if reference_len is None:
            reference_len = max(_tokens(_key(a))[1] for a in samples)
        samples = [ref_dropout.apply(a, opts.reference_dropout, opts.seed, first_index + i)
                   for i, a in enumerate(samples)]
    return assemble_batch(samples, scheme, target_len, reference_len, weights)


def _key(arrays: dict) -> LatentKey:
    n = sum(k.startswith("ref") and k[3:].isdigit() for k in arrays)
    return tuple(arrays["target"].shape[:2]), tuple(tuple(arrays[f"ref{j}"].shape[:2]) for j in range(n))


def _tokens(key: LatentKey) -> tuple[int, int]:
    (th, tw), refs = key
    return positions.num_tokens(th, tw), sum(positions.num_tokens(h, w) for h, w in refs)


class _LoadBatch:
    """Grain map: step -> this process's batch (picklable for worker processes)."""

    def __init__(self, shard_paths: list[str], keys: list[LatentKey], plan: BatchPlan, scheme: str,
                 batching: str, pad_multiple: int, process_index: int, local_batch: int,
                 options: SampleOptions = SampleOptions()):
        self.shard_paths, self.keys, self.plan, self.scheme = shard_paths, keys, plan, scheme
        self.options = options
        self.batching, self.pad_multiple = batching, pad_multiple
        self.process_index, self.local_batch = process_index, local_batch
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def source(self):
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)
        return self._source

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        glob = self.plan.global_batch(step)
        lo = self.process_index * self.local_batch
        mine = glob[lo:lo + self.local_batch]
        src = self.source()
        records = [decode_record(b) for b in src.__getitems__([int(i) for i in mine])]
        t_len = r_len = None
        if self.batching == "pad":  # pad to the global batch's maxima: every process gets the same shapes
            toks = [_tokens(self.keys[int(i)]) for i in glob]
            t_len = round_up(max(t for t, _ in toks), self.pad_multiple)
            r_len = round_up(max(r for _, r in toks), self.pad_multiple)
        batch = process_samples(records, step * self.plan.batch_size + lo, self.options, self.scheme, t_len, r_len)
        batch["step"] = np.asarray(step, np.int64)
        return batch


# --------------------------------------------------------------------------- streams


class _StepStream:
    """Endless iterator over ``fn(step)`` run by Grain; state = the next step."""

    def __init__(self, fn, num_workers: int, fingerprint: dict[str, Any], prefetch: int = 2):
        self._fn, self._num_workers, self._prefetch = fn, num_workers, prefetch
        self.fingerprint = fingerprint
        self._step, self._it = 0, None

    def _start(self):
        import grain

        ds = grain.MapDataset.range(self._step, _ENDLESS).map(self._fn)
        read = grain.ReadOptions(num_threads=max(1, self._prefetch), prefetch_buffer_size=self._prefetch)
        it_ds = ds.to_iter_dataset(read)
        if self._num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads absl flags in mp_prefetch; we use none
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        self._it = iter(it_ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        batch = next(self._it)
        got = int(batch.pop("step"))
        if got != self._step:
            raise RuntimeError(f"data stream out of order: expected step {self._step}, got {got}")
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able; ``set_state`` of it continues with exactly the next batch."""
        return {"step": self._step, **self.fingerprint}

    def set_state(self, state: dict[str, Any] | bytes | str) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        # the position is global (a step of the global batch plan): another process count or index re-splits it
        diff = {k: (state.get(k), v) for k, v in self.fingerprint.items()
                if state.get(k) != v and k not in ("process_index", "process_count")}
        if diff:
            raise ValueError(f"data iterator state is for another stream: {diff} (saved, current)")
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def check_shard(path: Path, num_records: int | None) -> None:
    """A shard listed in ``index.json`` exists, opens and holds its records; :class:`CacheError` naming it."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not path.is_file():
        raise CacheError(f"{path} listed in index.json is missing")
    try:
        reader = ArrayRecordReader(str(path))
        try:
            n = reader.num_records()
        finally:
            reader.close()
    except Exception as e:  # noqa: BLE001 - any failure to open means a damaged shard
        raise CacheError(f"{path}: damaged cache shard ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") \
            from None
    if num_records is not None and n != num_records:
        raise CacheError(f"{path}: damaged cache shard ({n} records, index.json lists {num_records})")


class CacheStream(_StepStream):
    """Batches from a cache folder for one process (see the module docstring)."""

    def __init__(self, cfg, process_index: int = 0, process_count: int = 1, cache_dir: str | None = None,
                 pad_multiple: int | None = None):
        self.index = index = load_index(cache_dir or cfg.data.cache_dir)
        cache_dir = Path(cache_dir or cfg.data.cache_dir)
        for s in index["shards"]:
            check_shard(cache_dir / s["file"], s.get("num_records"))
        keys = [(tuple(r["target_latent"]), tuple(tuple(x) for x in r["reference_latents"])) for r in index["records"]]
        if cfg.train.loss_mask == "manifest" and not any(r.get("mask") for r in index["records"]):
            raise ValueError(f"train.loss_mask='manifest' but no record of the cache {cache_dir} has a mask (add "
                             "\"mask\" to the manifest lines / NAME_mask.png files and re-run scripts/cache.py)")
        d = cfg.data
        plan = BatchPlan(keys, d.batch_size, d.batching, d.shuffle_seed)
        local = _local_batch(cfg, process_count)
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        fn = _LoadBatch([str(cache_dir / s["file"]) for s in index["shards"]], keys, plan, cfg.model.position_scheme,
                        d.batching, int(pad_multiple or d.pad_multiple), process_index, local,
                        SampleOptions.from_config(cfg))
        self.plan = plan
        arrays, _ = decode_record((cache_dir / index["empty_prompt"]).read_bytes())
        self.empty_prompt = (np.array(arrays["text"]), np.array(arrays["pooled"]))
        fp = {"source": "cache", "num_records": index["num_records"], "batch_size": d.batch_size,
              "batching": d.batching, "seed": d.shuffle_seed, "process_index": process_index,
              "process_count": process_count}
        super().__init__(fn, d.num_workers, fp)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch


@dataclass(frozen=True)
class ModelDims:
    """Sizes a synthetic batch needs (defaults: Flux Kontext dev)."""

    latent_channels: int = 16
    text_dim: int = 4096
    pooled_dim: int = 768
    downscale: int = 8

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ModelDims":
        """From a converted (or diffusers) folder's ``vae/``, ``text_encoder/``, ``text_encoder_2/`` configs (FLUX.2
        [klein]: ``vae/`` and ``transformer/``)."""
        root = Path(path)

        def cfg(sub):
            p = root / sub / "config.json"
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found (model.path must be a converted model folder)")
            return json.loads(p.read_text())

        vae = cfg("vae")

        fam = families.for_path(root)
        if not fam.has_pooled:  # FLUX.2 [klein]: sizes from the transformer (Qwen3 features, no pooled embedding)
            dims = cls.from_flux_config(fam.config_class().from_dict(cfg("transformer"), source=str(root / "transformer")))
            return cls(latent_channels=dims.latent_channels, text_dim=dims.text_dim, pooled_dim=0,
                       downscale=2 ** (len(vae["block_out_channels"]) - 1))
        return cls(latent_channels=int(vae["latent_channels"]), text_dim=int(cfg("text_encoder_2")["d_model"]),
                   pooled_dim=int(cfg("text_encoder")["hidden_size"]),
                   downscale=2 ** (len(vae["block_out_channels"]) - 1))

    @classmethod
    def from_flux_config(cls, fc) -> "ModelDims":
        """From a transformer's ``FluxConfig`` / ``Flux2Config`` (packed input width = 4 latent channels; VAE
        downscale 8; FLUX.2 has no pooled text embedding)."""
        return cls(latent_channels=fc.in_channels // 4, text_dim=fc.joint_attention_dim,
                   pooled_dim=getattr(fc, "pooled_projection_dim", 0) or 0)


# --------------------------------------------------------------------------- synthetic batches


def synthetic_layout(cfg, downscale: int = 8) -> positions.SampleLayout:
    """Latent sizes of a synthetic sample: ``data.synthetic_resolution`` with ``data.synthetic_refs`` (pixel
    sizes, (w, h)) divided by the VAE ``downscale``."""
    (w, h), f = cfg.data.synthetic_resolution, downscale
    return positions.SampleLayout((h // f, w // f), tuple((rh // f, rw // f) for rw, rh in cfg.data.synthetic_refs))


def synthetic_sample(rng: np.random.Generator, layout: positions.SampleLayout, dims: ModelDims, text_len: int,
                     dtype=np.float32) -> dict[str, np.ndarray]:
    """One random record like the cache's (``target`` / ``ref{j}`` latents [h, w, C], ``t5`` [L, D], ``pooled``):
    standard-normal float32 draws in that order, cast to ``dtype``."""
    c = dims.latent_channels
    return {"target": rng.standard_normal((*layout.target, c), np.float32).astype(dtype),
            **{f"ref{j}": rng.standard_normal((h, w, c), np.float32).astype(dtype)
               for j, (h, w) in enumerate(layout.references)},
            "text": rng.standard_normal((text_len, dims.text_dim), np.float32).astype(dtype),
            "pooled": rng.standard_normal((dims.pooled_dim,), np.float32).astype(dtype)}


def synthetic_batch(rng: np.random.Generator, layouts: Sequence[positions.SampleLayout], *, channels: int = 64,
                    text_len: int = 512, text_dim: int = 4096, pooled_dim: int = 768, scheme: str = "dreamomni2",
                    target_len: int | None = None, reference_len: int | None = None) -> dict[str, np.ndarray]:
    """Random float32 batch in the training format for ``layouts`` (latent sizes; ``channels`` = packed width
    4C), drawn directly as packed tokens (per sample: target then references), padded per section (zeros) by
    :func:`positions.batch_layout`. For tests and benchmarks; the stream's records come from
    :func:`synthetic_sample`."""
    lay = positions.batch_layout(layouts, scheme, target_len, reference_len)
    n = len(layouts)
    tgt = np.zeros((n, lay.target_len, channels), np.float32)
    refs = np.zeros((n, lay.reference_len, channels), np.float32)
    for i, s in enumerate(layouts):
        tgt[i, : s.target_tokens] = rng.standard_normal((s.target_tokens, channels))
        refs[i, : s.reference_tokens] = rng.standard_normal((s.reference_tokens, channels))
    return {"target": tgt, "references": refs, "img_ids": lay.ids, "img_mask": lay.mask,
            "text": rng.standard_normal((n, text_len, text_dim)).astype(np.float32),
            "pooled": rng.standard_normal((n, pooled_dim)).astype(np.float32)}


class _SyntheticBatch:
    """Grain map: step -> one of ``pool`` fixed random batches (cheap; same shapes every step)."""

    def __init__(self, cfg, dims: ModelDims, local_batch: int, pool: int = 2, process_index: int = 0):
        d, dtype = cfg.data, np_dtype(cfg.model.param_dtype)
        layout = synthetic_layout(cfg, dims.downscale)
        self.pool = []
        for k in range(pool):
            rng = np.random.default_rng([d.shuffle_seed, k])
            self.pool.append([synthetic_sample(rng, layout, dims, d.max_sequence_length, dtype)
                              for _ in range(local_batch)])
        self.options, self.scheme, self.local_batch = SampleOptions.from_config(cfg), cfg.model.position_scheme, \
            local_batch
        self.process_index, self.batch_size = process_index, d.batch_size
        self._plain = None if self.options.reference_dropout > 0 else [
            process_samples([(s, {}) for s in p], 0, self.options, self.scheme, None, None) for p in self.pool]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        if self._plain is not None:
            batch = self._plain[step % len(self.pool)]
        else:  # reference dropout: per global sample index
            first = step * self.batch_size + self.process_index * self.local_batch
            batch = process_samples([(s, {}) for s in self.pool[step % len(self.pool)]], first, self.options,
                                    self.scheme, None, None)
        return {**batch, "step": np.asarray(step, np.int64)}


class SyntheticSource(_StepStream):
    """Random batches of ``data.synthetic_resolution`` with ``data.synthetic_refs`` (pixel sizes, (w, h))."""

    def __init__(self, cfg, model_dims: ModelDims | dict | None = None, process_index: int = 0, process_count: int = 1):
        dims = model_dims if isinstance(model_dims, ModelDims) else ModelDims(**(model_dims or {}))
        f2 = 2 * dims.downscale
        for w, h in (cfg.data.synthetic_resolution, *cfg.data.synthetic_refs):
            if w % f2 or h % f2:
                raise ValueError(f"synthetic size {(w, h)} must be multiples of {f2} pixels")
        self.dims = dims
        fn = _SyntheticBatch(cfg, dims, _local_batch(cfg, process_count), process_index=process_index)
        rng = np.random.default_rng([cfg.data.shuffle_seed, 2**32 - 1])  # not a pool index
        dtype = fn.pool[0][0]["text"].dtype
        self.empty_prompt = (rng.standard_normal((cfg.data.max_sequence_length, dims.text_dim), np.float32).astype(dtype),
                             rng.standard_normal((dims.pooled_dim,), np.float32).astype(dtype))
        fp = {"source": "synthetic", "batch_size": cfg.data.batch_size, "process_count": process_count}
        super().__init__(fn, 0, fp)


def make_train_stream(cfg, process_index: int = 0, process_count: int = 1, dims: ModelDims | None = None):
    """The training stream: :class:`CacheStream` over ``data.cache_dir``, or :class:`SyntheticSource` when it is
    empty, with the model sizes ``dims`` (default: from ``model.path`` when that folder exists, else Flux Kontext
    dev's)."""
    if cfg.data.cache_dir:
        return CacheStream(cfg, process_index, process_count)
    if dims is None:
        dims = ModelDims.from_model_dir(cfg.model.path) if cfg.model.path and Path(cfg.model.path).is_dir() \
            else ModelDims()
    return SyntheticSource(cfg, dims, process_index, process_count)
