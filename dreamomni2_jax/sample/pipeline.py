"""Multi-reference Flux Kontext / DreamOmni2 sampler (editing and generation), pure JAX.

Follows diffusers' ``FluxKontextPipeline.__call__`` with the DreamOmni2 pipeline's multi-image ``prepare_latents``:

1. references (paths, PIL images, or ``[H, W, 3]`` arrays: uint8, or float in [0, 1]) are snapped to the closest
   aspect ratio of the Kontext preferred resolutions (DreamOmni2 ``resizeinput``: aspect of the image as given) and
   floored to multiples of 16 (``auto_resize=False``: only floored), lanczos-resized and mapped to [-1, 1];
2. the output size is ``height``/``width`` (default: the first reference's snapped size, else 1024²), fitted to
   ``max_area`` with its aspect ratio and floored to 16, exactly as Kontext does (``max_area=None``: floor only);
3. references are VAE-encoded (mode, ``(z - shift) * scale``), packed and concatenated after the target tokens;
   ids from :mod:`dreamomni2_jax.layout.ids_flux1` (``scheme``: ``"dreamomni2"`` = domain i+1 and cumulative column
   offsets, ``"kontext"`` = no offsets; both equal Kontext's ids for one reference);
4. FlowMatch Euler with dynamic shift (:mod:`dreamomni2_jax.sample.schedule`), guidance embedding, optional true CFG
   (``true_cfg_scale > 1`` and a ``negative_prompt``: ``neg + scale * (pos - neg)``, positive and negative in one
   doubled batch), all steps in ONE jitted ``lax.scan``; progress comes from the scan through
   ``jax.debug.callback`` into a tqdm bar on the host;
5. VAE decode of ``z / scale + shift``, ``x / 2 + 0.5`` clipped: float32 images ``[N, H, W, 3]`` in [0, 1].

Differences from diffusers, on purpose: the carried latents and the Euler update stay float32 (diffusers rounds
them to the model dtype every step), and timestep / guidance reach the model in float32. In float32 the numbers are
the same. Prompts whose inputs have different shapes run as separate batches (same results). Float arrays are
resized per channel in float (PIL mode F) instead of diffusers' nearest-neighbour tensor resize. Kontext takes the
snapping aspect ratio after flooring the input to 16 px, DreamOmni2's ``resizeinput`` (and we) before; they differ
only for inputs near the midpoint between two preferred aspect ratios.

A transformer sharded over a mesh (the training loop's) is used as is: the other inputs are replicated on its
mesh, the final latents come back to the host for the (single-device) VAE decode.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from dreamomni2_jax import families
from dreamomni2_jax.layout import ids_flux1 as positions
from dreamomni2_jax import sharding as shd
from dreamomni2_jax.utils.atomic_write import atomic_file
from dreamomni2_jax.images.sizes import KONTEXT_AREA, target_size
from dreamomni2_jax.models.vae import VAE, decode_latents, encode_images
from dreamomni2_jax.images.references import (  # noqa: F401 - reference_pixels / klein_reference_pixels: public here too
    MULTIPLE, ImageLike, floor16, klein_reference_pixels, reference_pixels)
from dreamomni2_jax.sample.schedule import FlowMatchConfig, euler_step, set_timesteps
from dreamomni2_jax.lora.attach import attach_lora

DEFAULT_SIZE = 1024


# --------------------------------------------------------------------------- sizes


def output_size(height: int | None, width: int | None, first_ref: tuple[int, int] | None,
                max_area: int | None) -> tuple[int, int]:
    """``(height, width)`` of the generated image (first_ref = ``(h, w)`` of the first reference's pixels)."""
    if (height is None) != (width is None):
        raise ValueError("pass both height and width, or neither")
    if height is None:
        height, width = first_ref if first_ref is not None else (DEFAULT_SIZE, DEFAULT_SIZE)
    if height < 1 or width < 1:
        raise ValueError(f"height/width must be positive, got {height}x{width}")
    if max_area is None:
        w, h = floor16(width, height, "output")
    else:
        w, h = target_size(width, height, max_area, MULTIPLE)
    return h, w


# --------------------------------------------------------------------------- denoising loop


def _denoise(graphdef, state, x, refs, embeds, pooled, img_ids, txt_ids, guidance, timesteps, sigmas,
             cfg_scale, tick: Callable, mesh=None):
    """All steps as one ``lax.scan``. ``embeds``/``pooled``/``guidance`` hold ``[pos; neg]`` (2B rows) with CFG.
    ``mesh``: the model's mesh, traced under as the context mesh (attention kernels per shard, ``auto``)."""
    if mesh is not None and jax.sharding.get_abstract_mesh().empty:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _denoise(graphdef, state, x, refs, embeds, pooled, img_ids, txt_ids, guidance, timesteps,
                            sigmas, cfg_scale, tick)
    model = nnx.merge(graphdef, state)
    family = families.for_model(model)
    b, n = x.shape[0], x.shape[1]
    cfg = embeds.shape[0] == 2 * b

    def body(lat, step):
        i, t, sigma, sigma_next = step
        inp = jnp.concatenate([lat.astype(refs.dtype), refs], axis=1)
        if cfg:
            inp = jnp.concatenate([inp, inp], axis=0)
        out = family.forward(model, inp, embeds, pooled, t / 1000.0, img_ids, txt_ids, guidance,
                             n_out=n).astype(jnp.float32)
        if cfg:
            out = out[b:] + cfg_scale * (out[:b] - out[b:])
        if tick is not None:  # None: no progress callback (compiling for a GPU without one: scripts/aot.py)
            jax.debug.callback(tick, i)
        return euler_step(lat, out, sigma, sigma_next), None

    steps = (jnp.arange(timesteps.shape[0]), timesteps, sigmas[:-1], sigmas[1:])
    lat, _ = jax.lax.scan(body, x.astype(jnp.float32), steps)
    return lat


_denoise_jit = jax.jit(_denoise, static_argnames=("graphdef", "tick", "mesh"))


class _Progress:
    """Host side of the scan's progress callback: counts steps, updates a tqdm bar per call (or nothing)."""

    def __init__(self):
        self.bar = None
        self.count = 0

    def tick(self, i) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)


# --------------------------------------------------------------------------- pipeline


@dataclasses.dataclass
class Pipeline:
    """Flux Kontext (or FLUX.2 [klein], ``family``) components. ``transformer`` may carry LoRA adapters;
    ``__call__(transformer=...)`` overrides it (e.g. the training loop's current, LoRA-patched model).

    FLUX.2 [klein] (``family=families.get("flux2-klein")``, ``text`` a :class:`~dreamomni2_jax.text.klein.KleinText`)
    follows ``Flux2KleinPipeline``: references capped at 1024² (area-preserving lanczos), floored to multiples of 16
    by a centre crop; the output defaults to the first reference's size (else 1024²), floored to 16 (no area fit);
    4-axis ids; ``compute_empirical_mu`` shift; ``guidance`` > 1 is classifier-free guidance against
    ``negative_prompt`` (default ``""``) unless ``distilled`` (model_index ``is_distilled``); ``scheme``,
    ``true_cfg_scale``, ``auto_resize``, ``max_area`` and ``reference_area`` are FLUX.1 settings and are ignored."""

    transformer: nnx.Module
    vae: VAE
    text: Any  # dreamomni2_jax.text.flux1.TextEncoders
    scheduler: FlowMatchConfig
    dtype: Any = jnp.bfloat16
    max_sequence_length: int = 512
    family: Any = None  # dreamomni2_jax.families.Family; None: FLUX.1
    distilled: bool = False  # klein: step-distilled checkpoint (no CFG), model_index.json ``is_distilled``
    _progress: _Progress = dataclasses.field(default_factory=_Progress, repr=False)

    def __call__(self, prompts: str | Sequence[str], references: Sequence | None = None, *,
                 height: int | None = None, width: int | None = None, steps: int = 28, guidance: float = 3.5,
                 seeds: int | Sequence[int] = 0, latents=None, scheme: str = "dreamomni2",
                 true_cfg_scale: float = 1.0, negative_prompt: str | Sequence[str] | None = None,
                 auto_resize: bool = True, max_area: int | None = KONTEXT_AREA, reference_area: int = KONTEXT_AREA,
                 transformer: nnx.Module | None = None, progress: bool = True, task: str | None = None,
                 ids_dtype: str = "int32") -> np.ndarray:
        """Generate ``len(prompts) * len(seeds)`` images, prompt-major (image ``k``: prompt ``k // S``, seed
        ``k % S``), as float32 ``[N, H, W, 3]`` in [0, 1].

        ``references``: one list of images per prompt, or one flat list shared by all prompts (``None`` / ``[]``:
        text-to-image). ``latents``: explicit initial noise, packed ``[N, target_tokens, 4 * latent_channels]``
        (parity tests); otherwise ``jax.random.normal`` from each seed. All outputs must have one size.
        ``max_area``: output area budget (Kontext; ``None``: size only floored to 16); ``reference_area``: see
        :func:`reference_pixels`. ``transformer``: use this (e.g. LoRA-patched, training) model instead.
        ``task``: ``editing`` (default with references): the output defaults to the source's (first reference's,
        snapped) size, as DreamOmni2's ``inference_edit.py``; ``generation`` (default without references): 1024²
        fitted to ``max_area``, as ``inference_gen.py`` and the Kontext pipeline without an image.
        ``ids_dtype``: ``bfloat16`` rounds the position ids like the reference bf16 pipelines
        (:func:`dreamomni2_jax.layout.ids_flux1.round_ids`).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
        seeds = [seeds] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
        if not seeds:
            raise ValueError("seeds must not be empty")
        fam = self._family
        if fam.guidance_is_cfg:  # klein: the guidance scale is CFG against the (empty) negative prompt
            true_cfg_scale = guidance if guidance > 1 and not self.distilled else 1.0
            negative_prompt = "" if negative_prompt is None else negative_prompt
        scheme = fam.scheme(scheme)
        max_area = max_area if fam.fits_output_area else None
        refs = self._references(prompts, references, auto_resize, reference_area)
        neg = self._negative(prompts, negative_prompt, true_cfg_scale)
        if scheme not in positions.schemes():
            raise ValueError(f"unknown position scheme {scheme!r}; known: {positions.schemes()}")
        if task not in (None, "editing", "generation"):
            raise ValueError(f"task={task!r} is not one of ['editing', 'generation']")
        sizes = [output_size(height, width, r[0].shape[:2] if r and (task or "editing") == "editing" else None,
                             max_area) for r in refs]
        if len(set(sizes)) > 1:
            raise ValueError(f"prompts give different output sizes {sorted(set(sizes))}: pass height/width or "
                             "sample them in separate calls")
        (h, w), s = sizes[0], len(seeds)
        n_total = len(prompts) * s
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            want = (n_total, positions.num_tokens(*self._latent_hw(h, w)), 4 * self.vae.config.latent_channels)
            if latents.shape != want:
                raise ValueError(f"latents must have shape {want} (N, target tokens, channels), got {latents.shape}")
        model = transformer if transformer is not None else self.transformer
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(refs):
            groups.setdefault(tuple(x.shape[:2] for x in r), []).append(i)
        out = np.zeros((n_total, h, w, 3), np.float32)
        for idx in groups.values():
            rows = [i * s + j for i in idx for j in range(s)]
            noise = latents[rows] if latents is not None else self._noise(h, w, [seeds[r % s] for r in rows])
            out[rows] = self._run(model, [prompts[i] for i in idx], [refs[i] for i in idx],
                                  None if neg is None else [neg[i] for i in idx], s, noise, h, w, steps, guidance,
                                  scheme, true_cfg_scale, progress, ids_dtype)
        return out

    # ----------------------------------------------------------------- helpers

    def _latent_hw(self, h: int, w: int) -> tuple[int, int]:
        f = self.vae.config.downscale
        return h // f, w // f

    @property
    def _family(self):
        return self.family if self.family is not None else families.get("flux1")

    def _references(self, prompts, references, auto_resize, area) -> list[list[np.ndarray]]:
        if references is None:
            references = []
        references = list(references)
        if not references or not isinstance(references[0], (list, tuple)):
            references = [references] * len(prompts)
        if len(references) != len(prompts):
            raise ValueError(f"got {len(references)} reference lists for {len(prompts)} prompts")
        cache: dict[int, np.ndarray] = {}
        out = []
        for i, refs in enumerate(references):
            row = []
            for j, img in enumerate(refs):
                if id(img) not in cache:
                    cache[id(img)] = self._family.reference_pixels(img, auto_resize, f"prompt {i} reference {j}", area)
                row.append(cache[id(img)])
            out.append(row)
        return out

    @staticmethod
    def _negative(prompts, negative_prompt, true_cfg_scale) -> list[str] | None:
        if true_cfg_scale <= 1 or negative_prompt is None:
            return None
        neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(neg) != len(prompts):
            raise ValueError(f"got {len(neg)} negative prompts for {len(prompts)} prompts")
        return neg

    def _noise(self, h: int, w: int, seeds: list[int]) -> np.ndarray:
        lh, lw = self._latent_hw(h, w)
        shape = (positions.num_tokens(lh, lw), 4 * self.vae.config.latent_channels)
        return np.stack([np.asarray(jax.random.normal(jax.random.key(sd), shape, jnp.float32)) for sd in seeds])

    def _encode_refs(self, refs: list[list[np.ndarray]]) -> tuple[jax.Array, list[tuple[int, int]]]:
        """Packed, normalized reference latents ``[B, ref_tokens, 4C]`` (references concatenated) + latent sizes."""
        parts, sizes = [], []
        for j in range(len(refs[0])):
            shared = all(r[j] is refs[0][j] for r in refs)  # one image for every prompt: encode it once
            x = refs[0][j][None] if shared else np.stack([r[j] for r in refs])
            z = self._family.normalize(self.vae, encode_images(self.vae, jnp.asarray(x)).astype(jnp.float32))
            sizes.append(tuple(z.shape[1:3]))
            tokens = positions.pack_latents(z)
            parts.append(jnp.broadcast_to(tokens, (len(refs), *tokens.shape[1:])))
        c4 = 4 * self.vae.config.latent_channels
        if not parts:
            return jnp.zeros((len(refs), 0, c4), jnp.float32), sizes
        return jnp.concatenate(parts, axis=1), sizes

    def _run(self, model, prompts, refs, neg, s, noise, h, w, steps, guidance, scheme, true_cfg_scale, progress,
             ids_dtype="int32"):
        lh, lw = self._latent_hw(h, w)
        ref_tokens, ref_sizes = self._encode_refs(refs)
        ref_tokens = jnp.repeat(ref_tokens, s, axis=0).astype(self.dtype)
        embeds, pooled = self.text.encode_prompt(prompts, self.max_sequence_length)
        if neg is not None:
            n_embeds, n_pooled = self.text.encode_prompt(neg, self.max_sequence_length)
            embeds, pooled = jnp.concatenate([embeds, n_embeds]), jnp.concatenate([pooled, n_pooled])
        reps = np.repeat(np.arange(embeds.shape[0]), s)  # [pos (B*s) ; neg (B*s)], seeds innermost
        embeds, pooled = embeds[reps], pooled[reps]
        img_ids = positions.round_ids(positions.SampleLayout((lh, lw), tuple(ref_sizes)).ids(scheme), ids_dtype)
        txt_ids = self._family.text_ids(embeds.shape[1]).astype(img_ids.dtype)
        cfg = model.config
        g = None if not cfg.guidance_embeds else jnp.full((embeds.shape[0],), guidance, jnp.float32)
        seq = positions.num_tokens(lh, lw)
        timesteps, sigmas = set_timesteps(self.scheduler, steps, image_seq_len=seq,
                                          mu=self._family.sample_mu(seq, steps))
        graphdef, state = nnx.split(model)
        inputs = (noise, ref_tokens, embeds, pooled, img_ids, txt_ids, g, timesteps, sigmas,
                  np.float32(true_cfg_scale))
        mesh = _model_mesh(state)
        if mesh is not None:  # model sharded over a mesh (training): inputs replicated on that mesh
            inputs = shd.place(inputs, jax.tree.map(lambda _: shd.replicated(mesh), inputs))
        self._progress.bar = _tqdm(steps) if progress else None
        self._progress.count = 0
        try:
            lat = _denoise_jit(graphdef, state, *inputs, tick=self._progress.tick, mesh=mesh)
            if mesh is not None:
                lat = shd.shard(lat, shd.replicated(mesh)).addressable_data(0)  # one full local copy
            lat = np.asarray(jax.block_until_ready(lat))
            jax.effects_barrier()  # all step callbacks have run
        finally:
            if self._progress.bar is not None:
                self._progress.bar.close()
            self._progress.bar = None
        z = self._family.denormalize(self.vae, positions.unpack_latents(lat, lh, lw))
        images = decode_latents(self.vae, z.astype(self.vae.dtype))
        return np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)


def _model_mesh(state) -> jax.sharding.Mesh | None:
    """The mesh of a model sharded over several devices (its first such param), else None."""
    for leaf in jax.tree.leaves(state):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None


def _tqdm(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoising", unit="step", leave=False)


# --------------------------------------------------------------------------- loading


def load_pipeline(model_dir: str | Path, dtype=jnp.bfloat16, *, lora: str | Path | None = None,
                  lora_scale: float = 1.0, vae_dtype=None, attention_impl: str = "auto",
                  max_sequence_length: int = 512) -> Pipeline:
    """Load transformer, VAE, text encoder(s) and the scheduler config from a converted folder (``convert/pipeline.py``
    output) or a diffusers Flux Kontext / FLUX.2 [klein] folder (converted on the fly), optionally with a LoRA at
    ``lora_scale``. The model family comes from the folder (:func:`dreamomni2_jax.families.for_path`)."""
    root = Path(model_dir)
    fam = families.for_path(root)
    text_dirs = ("text_encoder", "tokenizer") if not fam.has_pooled else ("text_encoder", "text_encoder_2",
                                                                          "tokenizer", "tokenizer_2")
    missing = [s for s in ("transformer", "vae", *text_dirs, "scheduler") if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root}: not a {fam.name} model folder, missing {missing}")
    index = families.json_dict(root / "model_index.json")
    pipe = Pipeline(
        transformer=fam.load_transformer(root / "transformer", dtype=dtype, attention_impl=attention_impl),
        vae=fam.load_vae(root / "vae", vae_dtype or dtype),
        text=fam.load_text(root, dtype),
        scheduler=FlowMatchConfig.from_json(root / "scheduler" / "scheduler_config.json"),
        dtype=dtype, max_sequence_length=max_sequence_length, family=fam,
        distilled=bool(index.get("is_distilled", False)))
    if lora is not None:
        attach_lora(pipe.transformer, lora, scale=lora_scale)
    return pipe


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 as diffusers' ``numpy_to_pil`` (``round(x * 255)``)."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write one ``[H, W, 3]`` image in [0, 1] (or uint8) as PNG: temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    with atomic_file(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return path
