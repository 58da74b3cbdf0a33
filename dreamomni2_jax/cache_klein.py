"""Cache-stage encoders of FLUX.2 [klein] (the counterpart of :class:`dreamomni2_jax.cache.JaxEncoders`).

Images: ``AutoencoderKLFlux2`` latents (mode) normalised as ``Flux2KleinPipeline._encode_vae_image`` does (2x2
patchify, ``(z - bn.running_mean) / sqrt(bn.running_var + eps)``), stored unpatchified ``[h, w, C]`` like FLUX.1
latents, so the data pipeline's packing gives exactly the pipeline's tokens. Text: Qwen3 prompt embeddings of
``text_klein`` (hidden states of three layers concatenated) in the records' ``t5`` slot, ``pooled`` empty ``[0]``
(FLUX.2 has no pooled embedding). Data-parallel over this host's devices, as for FLUX.1.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dreamomni2_jax.cache import _DataParallel

log = logging.getLogger(__name__)


class KleinEncoders:
    """Converted FLUX.2 VAE + Qwen3 from ``model_dir`` (a ``convert/pipeline.py`` output of a klein pipeline)."""

    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_sequence_length: int = 512,
                 image_batch: int = 8, text_batch: int = 16):
        import jax.numpy as jnp

        from dreamomni2_jax.families import get
        from dreamomni2_jax.text_klein import load_klein_text, prompt_embeds, tokenize

        root = Path(model_dir)
        if not (root / "vae").is_dir():
            raise FileNotFoundError(f"{root / 'vae'}: converted VAE missing (model.path must be a convert/pipeline.py "
                                    f"output folder)")
        fam = get("flux2-klein")
        jdtype = jnp.dtype(dtype)
        self.vae = fam.load_vae(root / "vae", jdtype)
        self.text = load_klein_text(root, jdtype)
        self.downscale = self.vae.config.downscale
        self.latent_channels = self.vae.config.latent_channels
        self.max_sequence_length = max_sequence_length
        self._tokenize = tokenize

        def encode(vae, x):
            z = vae.encode(x)
            return fam.normalize(vae, z.astype(jnp.float32)).astype(z.dtype)

        self._vae = _DataParallel(self.vae, encode, image_batch)
        self.image_batch = self._vae.batch
        layers = self.text.layers
        self._qwen = _DataParallel(self.text.model, lambda m, x: prompt_embeds(m, x[:, 0], x[:, 1], layers), text_batch)
        log.info("klein encoders on %d local devices (image batch %d)",
                 len(self._vae.in_sharding.mesh.devices.flat), self._vae.batch)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self._vae(np.asarray(images, np.float32))

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self._tokenize(self.text.tokenizer, list(prompts), self.max_sequence_length)
        embeds = self._qwen(np.stack([ids, mask], axis=1))  # [N, 2, L]: split over devices together
        return embeds, np.zeros((embeds.shape[0], 0), embeds.dtype)
