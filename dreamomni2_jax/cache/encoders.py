"""Cache-stage encoders: the converted VAE and text encoders of a ``convert/pipeline.py`` output folder, jitted
data-parallel over this host's devices (:class:`DataParallel`), for :func:`dreamomni2_jax.cache.stage.build_cache`.

* :class:`JaxEncoders` (FLUX.1 Kontext): ``AutoencoderKL`` latents (mode) normalised ``(z - shift) * scale``; T5
  embeddings and the pooled CLIP embedding;
* :class:`KleinEncoders` (FLUX.2 [klein]): ``AutoencoderKLFlux2`` latents (mode) normalised as
  ``Flux2KleinPipeline._encode_vae_image`` does (2x2 patchify, ``(z - bn.running_mean) / sqrt(bn.running_var +
  eps)``: the family's ``normalize``), stored unpatchified ``[h, w, C]`` like FLUX.1 latents, so the data
  pipeline's packing gives exactly the pipeline's tokens. Text: Qwen3 prompt embeddings of ``text_klein`` (hidden
  states of three layers concatenated) in the records' ``t5`` slot, ``pooled`` empty ``[0]`` (FLUX.2 has no pooled
  embedding).

The model family picks its encoders (:meth:`dreamomni2_jax.families.Flux1Family.make_encoders`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from dreamomni2_jax.cache.records import round_up
from dreamomni2_jax.models.vae import normalize_latents
from dreamomni2_jax.convert.loaders import load_vae
from dreamomni2_jax.text.flux1 import load_text_encoders
from dreamomni2_jax.convert.loaders import load_vae_flux2
from dreamomni2_jax.text.klein import load_klein_text, prompt_embeds, tokenize

log = logging.getLogger(__name__)


class DataParallel:
    """``fn(module, x)`` jitted with the module replicated and ``x`` split on axis 0 over local devices.

    Batches are padded to a fixed ``batch`` (a multiple of the device count) so each input shape
    compiles once.
    """

    def __init__(self, module, fn, batch: int):
        import jax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        devices = jax.local_devices()
        mesh = Mesh(np.array(devices), ("batch",))
        graphdef, state = nnx.split(module)
        self.state = jax.device_put(state, NamedSharding(mesh, P()))
        self.in_sharding = NamedSharding(mesh, P("batch"))
        self.batch = round_up(max(batch, 1), len(devices))
        self.jitted = jax.jit(lambda state, x: fn(nnx.merge(graphdef, state), x))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import jax

        out = []
        for i in range(0, x.shape[0], self.batch):
            part = x[i:i + self.batch]
            n = part.shape[0]
            if n < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - n, *part.shape[1:]), part.dtype)])
            y = self.jitted(self.state, jax.device_put(part, self.in_sharding))
            out.append(jax.tree.map(lambda a: np.asarray(a)[:n], y))
        return jax.tree.map(lambda *a: np.concatenate(a), *out) if len(out) > 1 else out[0]


class _VaeEncoders:
    """The converted VAE of ``model_dir`` (loaded by ``load_vae(path, dtype)``), encoding images to latents
    normalised by ``normalize(vae, z)``, data-parallel in batches of ``image_batch``."""

    what = "encoders"  # in the log line

    def __init__(self, model_dir: str | Path, dtype: str, max_sequence_length: int, image_batch: int,
                 load_vae: Callable, normalize: Callable):
        import jax.numpy as jnp

        self.root = Path(model_dir)
        if not (self.root / "vae").is_dir():
            raise FileNotFoundError(f"{self.root / 'vae'}: converted VAE missing (model.path must be a "
                                    f"convert/pipeline.py output folder)")
        self.jdtype = jnp.dtype(dtype)
        self.vae = load_vae(self.root / "vae", self.jdtype)
        self.downscale = self.vae.config.downscale
        self.latent_channels = self.vae.config.latent_channels
        self.max_sequence_length = max_sequence_length

        def encode(vae, x):
            z = vae.encode(x)
            return normalize(vae, z.astype(jnp.float32)).astype(z.dtype)

        self._vae = DataParallel(self.vae, encode, image_batch)
        self.image_batch = self._vae.batch
        log.info("%s on %d local devices (image batch %d)", self.what,
                 len(self._vae.in_sharding.mesh.devices.flat), self._vae.batch)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self._vae(np.asarray(images, np.float32))


def _normalize_flux1(vae, z):
    return normalize_latents(z, vae.config)


class JaxEncoders(_VaeEncoders):
    """Converted VAE + CLIP/T5 from ``model_dir`` (``convert/pipeline.py`` output), data-parallel over local devices."""

    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_sequence_length: int = 512,
                 image_batch: int = 8, text_batch: int = 16):
        super().__init__(model_dir, dtype, max_sequence_length, image_batch, load_vae, _normalize_flux1)
        self.text = load_text_encoders(self.root, dtype=self.jdtype)
        self._clip = DataParallel(self.text.clip, lambda m, ids: m(ids)[1], text_batch)
        self._t5 = DataParallel(self.text.t5, lambda m, ids: m(ids), text_batch)

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        clip_ids, t5_ids = self.text.tokenize(list(prompts), self.max_sequence_length)
        return self._t5(t5_ids), self._clip(clip_ids)


class KleinEncoders(_VaeEncoders):
    """Converted FLUX.2 VAE + Qwen3 from ``model_dir`` (a ``convert/pipeline.py`` output of a klein pipeline);
    ``normalize(vae, z)``: the klein family's latent normalisation."""

    what = "klein encoders"

    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_sequence_length: int = 512,
                 image_batch: int = 8, text_batch: int = 16, *, normalize: Callable):
        super().__init__(model_dir, dtype, max_sequence_length, image_batch, load_vae_flux2, normalize)
        self.text = load_klein_text(self.root, self.jdtype)
        self._tokenize = tokenize
        layers = self.text.layers
        self._qwen = DataParallel(self.text.model, lambda m, x: prompt_embeds(m, x[:, 0], x[:, 1], layers), text_batch)

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self._tokenize(self.text.tokenizer, list(prompts), self.max_sequence_length)
        embeds = self._qwen(np.stack([ids, mask], axis=1))  # [N, 2, L]: split over devices together
        return embeds, np.zeros((embeds.shape[0], 0), embeds.dtype)


__all__ = ["DataParallel", "JaxEncoders", "KleinEncoders"]
