"""Validation sampling during training: a grid PNG per validation step plus a TensorBoard image.

    hook = make_validation_callback(cfg, transformer_getter, model_dir, run_dir)
    ...
    hook(step, model)   # every step; samples when step % cfg.sample.every_steps == 0 (step > 0)
    hook.close()
    # or, with dreamomni2_jax.train.loop: train(ctx, callbacks=[make_validation_callback(cfg, None, model_dir, run_dir)])

Each ``cfg.sample.validation`` entry (prompt, reference paths, seed, size) is sampled with the current
(LoRA-patched) transformer ``transformer_getter(model)`` through :class:`dreamomni2_jax.sample.pipeline.Pipeline`, with
``cfg.sample`` steps / guidance / true CFG, ``cfg.model.position_scheme`` ids, the entry's height x width (floored
to 16, no area refit; :func:`preview_size` when 0: an editing entry at its source's size as cached, a generation
entry square) and references sized like the cache stage does (Kontext resolutions at the reference area budget).
With ``sample.eval_records`` = N > 0, the first N records of ``data.eval_cache_dir`` are previewed too
(:mod:`dreamomni2_jax.callbacks.previews`): cached prompt embeddings, references and target decoded from their latents,
sampled at the target's size. The grid has one row per entry: its prompt on a line above, then its references, the
output and (held-out records) the target side by side, all scaled to one row height.
Written to ``run_dir/samples/step_XXXXXX.png`` (temp + rename) and ``run_dir/tb`` (tensorboardX, tag
``validation``) by process 0; every process runs the sampling (it is SPMD when the model is sharded).

Memory: VAE and text encoders are loaded at the first validation, not before. The prompts are fixed, so their
T5/CLIP embeddings are computed once and the text encoders are dropped right after.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dreamomni2_jax import families
from dreamomni2_jax.callbacks.previews import decode_latent, read_eval_records
from dreamomni2_jax.config import Config, ValidationSample
from dreamomni2_jax.images.grid import ROW_HEIGHT, make_grid
from dreamomni2_jax.images.io import open_image
from dreamomni2_jax.images.sizes import editing_size
from dreamomni2_jax.sample.pipeline import Pipeline, save_png, to_uint8
from dreamomni2_jax.sample.schedule import FlowMatchConfig
from dreamomni2_jax.utils.dtypes import np_dtype
from dreamomni2_jax.utils.tensorboard import summary_writer

log = logging.getLogger(__name__)


class CachedPrompts:
    """``encode_prompt`` over a fixed prompt set: embeddings computed once, the encoders not kept."""

    def __init__(self, text, prompts, max_sequence_length: int, cached: dict | None = None):
        """``text``: encoders, or a zero-argument callable loading them (called only when ``prompts`` is not
        empty); ``cached``: ``{prompt: (embeds [L, D], pooled [Dp])}`` already encoded (held-out records)."""
        self.max_sequence_length = max_sequence_length
        self.table: dict[str, tuple[jax.Array, jax.Array]] = {
            p: (jnp.asarray(e), jnp.asarray(q)) for p, (e, q) in (cached or {}).items()}
        prompts = [p for p in dict.fromkeys(prompts) if p not in self.table]
        if prompts and callable(text) and not hasattr(text, "encode_prompt"):
            text = text()
        for p in prompts:
            embeds, pooled = text.encode_prompt([p], max_sequence_length)
            self.table[p] = (embeds[0], pooled[0])

    def encode_prompt(self, prompts, max_sequence_length: int = 512):
        if max_sequence_length != self.max_sequence_length:
            raise ValueError(f"prompts were encoded with max_sequence_length={self.max_sequence_length}")
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise KeyError(f"prompts not in the validation set: {missing}")
        return (jnp.stack([self.table[p][0] for p in prompts]), jnp.stack([self.table[p][1] for p in prompts]))


def preview_task(sample: ValidationSample) -> str:
    """``sample.task``, else editing with references and generation without."""
    return sample.task or ("editing" if sample.references else "generation")


def preview_size(sample: ValidationSample, source_size: tuple[int, int] | None,
                 target_max_area: int) -> tuple[int, int]:
    """``(height, width)`` of a validation output: the entry's when set; else editing: the size the cache gives the
    pair (:func:`dreamomni2_jax.images.sizes.editing_size` of the source, ``source_size`` = its ``(w, h)``), generation:
    the largest square multiple of 16 within ``target_max_area`` (1024 x 1024 at 1 MP, as DreamOmni2's
    inference_gen.py)."""
    if sample.height and sample.width:
        return sample.height, sample.width
    if preview_task(sample) == "editing":
        w, h = editing_size(*source_size, target_max_area)
        return h, w
    side = max(16, int(target_max_area ** 0.5) // 16 * 16)
    return side, side


class ValidationCallback:
    """``hook(step, model)``: validation sampling every ``cfg.sample.every_steps`` (a no-op when disabled)."""

    def __init__(self, cfg: Config, transformer_getter: Callable[[Any], Any] | None, model_dir: str | Path,
                 run_dir: str | Path, row_height: int = ROW_HEIGHT):
        self.cfg = cfg
        self.every = cfg.sample.every_steps
        self.samples = cfg.sample.validation
        self.transformer_getter = transformer_getter or _default_transformer
        self.model_dir = Path(model_dir)
        self.run_dir = Path(run_dir)
        self.row_height = row_height
        self.reference_area = cfg.data.reference_max_area
        self._pipe = None
        self._writer = None
        self.eval_records = []
        if self.every > 0 and cfg.sample.eval_records > 0:  # read now: a bad cache fails at start-up

            self.eval_records = read_eval_records(cfg.data.eval_cache_dir, cfg.sample.eval_records,
                                                  cfg.data.max_sequence_length)
        if self.enabled:
            for i, s in enumerate(self.samples):  # fail at start-up, not hours into training
                if s.task not in ("", "editing", "generation") or (s.task == "editing" and not s.references):
                    raise ValueError(f"sample.validation[{i}].task={s.task!r}: editing (needs references), "
                                     f"generation or empty")
                if (s.height > 0) != (s.width > 0):
                    raise ValueError(f"sample.validation[{i}]: set both height and width, or neither")
                for r in s.references:
                    open_image(r, f"sample.validation[{i}]")

    @property
    def enabled(self) -> bool:
        return self.every > 0 and (len(self.samples) > 0 or len(self.eval_records) > 0)

    def __call__(self, step: int, model) -> None:
        if self.enabled and step > 0 and step % self.every == 0:
            self.run(step, model)

    def _pipeline(self):
        if self._pipe is None:
            fam = families.for_path(self.model_dir)  # FLUX.1 / FLUX.2 [klein] VAE and text encoder
            dtype = np_dtype(self.cfg.model.compute_dtype)
            max_len = self.cfg.data.max_sequence_length
            prompts = [s.prompt for s in self.samples]
            if self.cfg.sample.true_cfg_scale > 1 or fam.guidance_is_cfg:
                prompts.append(self.cfg.sample.negative_prompt)
            cached = {r.prompt: (r.t5, r.pooled) for r in self.eval_records}
            text = CachedPrompts(lambda: fam.load_text(self.model_dir, dtype), prompts, max_len, cached)
            index = families.json_dict(self.model_dir / "model_index.json")
            self._pipe = Pipeline(
                transformer=None, vae=fam.load_vae(self.model_dir / "vae", dtype), text=text,
                scheduler=FlowMatchConfig.from_json(self.model_dir / "scheduler" / "scheduler_config.json"),
                dtype=dtype, max_sequence_length=max_len, family=fam,
                distilled=bool(index.get("is_distilled", False)))
        return self._pipe

    def sample(self, model) -> list[tuple[list[np.ndarray], np.ndarray, np.ndarray | None]]:
        """``[(reference images uint8, output uint8, target uint8 or None)]`` per validation entry, then per held-out
        record (every process)."""
        pipe, transformer, sc = self._pipeline(), self.transformer_getter(model), self.cfg.sample
        out = []
        for i, s in enumerate(self.samples):
            refs = [open_image(r, f"sample.validation[{i}]") for r in s.references]
            height, width = preview_size(s, refs[0].size if refs else None, self.cfg.data.target_max_area)
            img = pipe(s.prompt, refs, height=height, width=width, steps=sc.steps, guidance=sc.guidance,
                       seeds=[s.seed], scheme=self.cfg.model.position_scheme, true_cfg_scale=sc.true_cfg_scale,
                       negative_prompt=sc.negative_prompt, max_area=None, reference_area=self.reference_area,
                       transformer=transformer, progress=False, task=preview_task(s),
                       ids_dtype=self.cfg.model.ids_dtype)[0]
            out.append(([np.asarray(r) for r in refs], to_uint8(img), None))
        f = pipe.vae.config.downscale
        for i, r in enumerate(self.eval_records):
            refs = [decode_latent(pipe.vae, z) for z in r.references]
            img = pipe(r.prompt, refs, height=r.target.shape[0] * f, width=r.target.shape[1] * f, steps=sc.steps,
                       guidance=sc.guidance, seeds=[i], scheme=self.cfg.model.position_scheme,
                       true_cfg_scale=sc.true_cfg_scale, negative_prompt=sc.negative_prompt, max_area=None,
                       reference_area=self.reference_area, transformer=transformer, progress=False,
                       task=r.task if r.task in ("editing", "generation") else None,
                       ids_dtype=self.cfg.model.ids_dtype)[0]
            out.append((refs, to_uint8(img), decode_latent(pipe.vae, r.target)))
        return out

    def run(self, step: int, model) -> Path | None:
        """Sample now and write the grid; returns its path on process 0 (else None)."""
        t0 = time.time()
        results = self.sample(model)
        if jax.process_index() != 0:
            return None
        grid = make_grid([refs + [img] + ([] if target is None else [target]) for refs, img, target in results],
                         self.row_height, captions=[s.prompt for s in self.samples] + [r.prompt for r in
                                                                                        self.eval_records])
        path = save_png(self.run_dir / "samples" / f"step_{step:06d}.png", grid)
        if self._writer is None:
            self._writer = summary_writer(self.run_dir / "tb")
        self._writer.add_image("validation", grid, global_step=step, dataformats="HWC")
        self._writer.flush()
        log.info("validation step %d: %d samples in %.1fs -> %s", step, len(results), time.time() - t0, path)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # dreamomni2_jax.train.loop.Callback protocol: pass the hook in train(ctx, callbacks=[...]).
    def on_start(self, ctx) -> None:
        pass

    def on_step_end(self, ctx, metrics) -> None:
        self(ctx.step, ctx)

    def on_end(self, ctx) -> None:
        self.close()


def _default_transformer(obj, ema: bool = False):
    """The loop's ``LoopContext`` -> ``ctx.model(ema=...)`` (current adapted model, eval mode; the EMA adapters
    with ``sample.use_ema``); a model -> itself."""
    model = getattr(obj, "model", None)
    return model(ema=ema) if callable(model) else obj


def make_validation_callback(cfg: Config, transformer_getter: Callable[[Any], Any] | None, model_dir: str | Path,
                         run_dir: str | Path) -> ValidationCallback:
    """The training loop's validation callable ``hook(step, model) -> None`` (see the module docstring); it is
    also a ``dreamomni2_jax.train.loop.Callback`` (``on_step_end(ctx, metrics)`` samples with ``ctx.model()``).

    ``transformer_getter(model)`` returns the Flux transformer (with its LoRA adapters) from whatever is passed as
    ``model``; ``None``: ``model.model()`` when it has that method (a ``LoopContext``), else ``model`` itself."""
    if transformer_getter is None and cfg.sample.use_ema:
        transformer_getter = functools.partial(_default_transformer, ema=True)
    return ValidationCallback(cfg, transformer_getter, model_dir, run_dir)
