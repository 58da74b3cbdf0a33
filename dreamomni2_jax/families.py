"""Model families: everything the cache / train / sample stages do differently for FLUX.1 Kontext and FLUX.2
[klein], in one place.

A :class:`Family` answers, for its transformer class: how to load it, how to call it (FLUX.1 takes a pooled CLIP
embedding and 3-axis ids, FLUX.2 neither), the text-token ids, the position-id scheme, which VAE / text encoder the
cache and the sampler load, how latents are normalised (FLUX.1: ``(z - shift) * scale``; FLUX.2: batch-norm
statistics on 2x2-patchified latents), the sizes of synthetic batches and the sampler's timestep shift ``mu``
(FLUX.1: the scheduler's dynamic shift; klein: ``compute_empirical_mu``). The stages ask :func:`for_path` (a model
folder: the family recorded by ``convert/pipeline.py``) or :func:`for_model` (a loaded transformer) and call it;
they hold no family checks of their own.

Latents between the stages are ``[B, h, w, C]`` normalised VAE latents for both families; packing them into
2x2-patch tokens (:func:`dreamomni2_jax.layout.ids_flux1.pack_latents`) is the same for both.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from dreamomni2_jax.layout import ids_flux1 as positions, ids_klein as positions_flux2


class Family:
    """What every model family answers (the stages call only this): the attributes below and the methods of
    :class:`Flux1Family`, which :class:`KleinFamily` overrides one by one.

    The methods import the model, loader and encoder modules when called, not at import time: the LoRA exporter
    and the converters ask a folder's family (:func:`for_path`) without importing JAX model code."""

    name: str  # as ``convert/pipeline.py`` records it in a converted folder's manifest
    schema: str  # its transformer's module schema (models/*_schema.py): the config class -> family mapping
    position_scheme: str | None = None  # None: the config's ``model.position_scheme``
    has_pooled: bool
    guidance_is_cfg: bool  # True: ``guidance`` is a CFG scale against the empty prompt (no guidance embedding)
    fits_output_area: bool  # the sampler fits the output size to ``max_area`` (Kontext); False: floor to 16 only

    def scheme(self, configured: str) -> str:
        """The position-id scheme to use given the config's ``model.position_scheme``."""
        return self.position_scheme or configured


class Flux1Family(Family):
    """FLUX.1 (Kontext / dev): ``FluxTransformer2DModel`` with a pooled CLIP embedding and 3-axis ids, the FLUX.1
    VAE with ``(z - shift) * scale``, CLIP-L + T5 prompts, the scheduler's dynamic shift."""

    name = "flux1"
    schema = "flux"
    has_pooled = True
    guidance_is_cfg = False
    fits_output_area = True

    # ---- transformer
    def config_class(self):
        # deferred import: asking a folder's family (exporter, converters) must not load JAX model code
        from dreamomni2_jax.models.flux import FluxConfig

        return FluxConfig

    def model_class(self):
        from dreamomni2_jax.models.flux import FluxTransformer2DModel

        return FluxTransformer2DModel

    def load_transformer(self, path, **kw):
        from dreamomni2_jax.convert.loaders import load_flux

        return load_flux(path, **kw)

    def forward(self, model, hidden, text, pooled, timestep, img_ids, txt_ids, guidance=None, attention_mask=None,
                n_out=None):
        return model(hidden, text, pooled, timestep, img_ids, txt_ids, guidance=guidance,
                     attention_mask=attention_mask, n_out=n_out)

    def text_ids(self, n: int) -> np.ndarray:
        return positions.text_ids(n)

    # ---- VAE and text encoders
    def load_vae(self, path, dtype):
        from dreamomni2_jax.convert.loaders import load_vae

        return load_vae(path, dtype)

    def normalize(self, vae, z):
        from dreamomni2_jax.models.vae import normalize_latents

        return normalize_latents(z, vae.config)

    def denormalize(self, vae, z):
        from dreamomni2_jax.models.vae import denormalize_latents

        return denormalize_latents(z, vae.config)

    def reference_pixels(self, image, auto_resize: bool, where: str, area: int):
        """One sampling reference as float32 ``[H, W, 3]`` in [-1, 1] (Kontext resolutions)."""
        from dreamomni2_jax.images.references import reference_pixels

        return reference_pixels(image, auto_resize, where, area)

    def load_text(self, root, dtype, param_sharding=None):
        from dreamomni2_jax.text.flux1 import load_text_encoders

        return load_text_encoders(root, dtype, param_sharding=param_sharding)

    def make_encoders(self, model_dir, dtype: str, max_sequence_length: int, image_batch: int, text_batch: int):
        from dreamomni2_jax.cache.encoders import JaxEncoders

        return JaxEncoders(model_dir, dtype, max_sequence_length, image_batch=image_batch, text_batch=text_batch)

    # ---- sampling
    def sample_mu(self, image_seq_len: int, steps: int) -> float | None:
        """``mu`` of the sampling schedule (None: the scheduler's own dynamic shift)."""
        return None


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """diffusers ``pipeline_flux2_klein.compute_empirical_mu``: the klein sampling shift, linear in the token count
    above 4300 tokens, else interpolated between the fits at 10 and 200 steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


class KleinFamily(Family):
    """FLUX.2 [klein]: ``Flux2Transformer2DModel`` (no guidance embedding, no pooled text), 4-axis ids (reference
    ``i`` at ``T = 10 + 10 i``, text ``[0, 0, 0, l]``), ``AutoencoderKLFlux2`` with batch-norm normalisation, Qwen3
    prompt embeddings, ``compute_empirical_mu`` shift, classifier-free guidance against the empty prompt."""

    name = "flux2-klein"
    schema = "flux2"
    position_scheme = positions.FLUX2
    has_pooled = False
    guidance_is_cfg = True
    fits_output_area = False

    def config_class(self):
        from dreamomni2_jax.models.flux2 import Flux2Config

        return Flux2Config

    def model_class(self):
        from dreamomni2_jax.models.flux2 import Flux2Transformer2DModel

        return Flux2Transformer2DModel

    def load_transformer(self, path, **kw):
        from dreamomni2_jax.convert.loaders import load_flux2

        return load_flux2(path, **kw)

    def forward(self, model, hidden, text, pooled, timestep, img_ids, txt_ids, guidance=None, attention_mask=None,
                n_out=None):
        return model(hidden, text, timestep, img_ids, txt_ids, guidance, attention_mask=attention_mask, n_out=n_out)

    def text_ids(self, n: int) -> np.ndarray:
        return positions_flux2.text_ids(n)

    def load_vae(self, path, dtype):
        from dreamomni2_jax.convert.loaders import load_vae_flux2

        return load_vae_flux2(path, dtype)

    def normalize(self, vae, z):
        h, w = z.shape[1:3]
        return positions.unpack_latents(vae.bn.normalize(positions.pack_latents(z)), h, w)

    def denormalize(self, vae, z):
        h, w = z.shape[1:3]
        return positions.unpack_latents(vae.bn.denormalize(positions.pack_latents(z)), h, w)

    def reference_pixels(self, image, auto_resize: bool, where: str, area: int):
        from dreamomni2_jax.images.references import klein_reference_pixels

        return klein_reference_pixels(image, where)  # the pipeline's own preprocessing (no Kontext resolutions)

    def load_text(self, root, dtype, param_sharding=None):
        from dreamomni2_jax.text.klein import load_klein_text

        return load_klein_text(root, dtype, param_sharding=param_sharding)

    def make_encoders(self, model_dir, dtype: str, max_sequence_length: int, image_batch: int, text_batch: int):
        from dreamomni2_jax.cache.encoders import KleinEncoders

        return KleinEncoders(model_dir, dtype, max_sequence_length, image_batch=image_batch, text_batch=text_batch,
                             normalize=self.normalize)

    def sample_mu(self, image_seq_len: int, steps: int) -> float | None:
        return compute_empirical_mu(image_seq_len, steps)


# family name (as ``convert/pipeline.py`` records it) -> its behaviour (stateless; read-only)
FAMILIES: Mapping[str, Family] = MappingProxyType({"flux1": Flux1Family(), "flux2-klein": KleinFamily()})


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def for_config(config) -> Family:
    """The family of a transformer config (``FluxConfig`` / ``Flux2Config``): the one of its model schema."""
    from dreamomni2_jax.models.roles import SchemaError
    from dreamomni2_jax.models.schemas import schema_for

    try:
        name = schema_for(config).name
    except SchemaError:
        name = None
    for fam in FAMILIES.values():
        if fam.schema == name:
            return fam
    raise TypeError(f"no model family for a transformer with config {type(config).__name__}")


def for_model(model) -> Family:
    """The family of a loaded (or abstract) transformer, from its config class."""
    return for_config(model.config)


def resolve_config(cfg):
    """``cfg`` with the settings its model's family fixes (FLUX.2: the ``flux2`` position ids), so every stage
    reading ``model.position_scheme`` gets the right one; unchanged for FLUX.1 or without ``model.path``."""
    import dataclasses

    if not cfg.model.path or not Path(cfg.model.path).exists():
        return cfg
    scheme = for_path(cfg.model.path).scheme(cfg.model.position_scheme)
    if scheme == cfg.model.position_scheme:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, position_scheme=scheme))


def json_dict(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def for_path(path: str | Path) -> Family:
    """The family of a model folder: a ``convert/pipeline.py`` output (the family its manifest records), a
    diffusers pipeline folder (``model_index.json``) or a transformer checkpoint folder (its ``config.json``)."""
    from dreamomni2_jax.weights.manifest import FAMILIES as PIPELINES, read_manifest

    p = Path(path)
    manifest = read_manifest(p) if p.is_dir() else None
    if manifest is not None:
        return get(manifest.get("family", "flux1"))
    index = json_dict(p / "model_index.json") if p.is_dir() else {}
    if index.get("_class_name") in PIPELINES:
        return get(PIPELINES[index["_class_name"]][0])
    for cfg in (p / "transformer" / "config.json", p / "config.json"):
        if cfg.is_file() and json_dict(cfg).get("_class_name") == "Flux2Transformer2DModel":
            return get("flux2-klein")
    return get("flux1")
