"""Load each model component from a converted folder (or a source checkpoint converted on the fly in memory).

One loader for every component (:func:`dreamomni2_jax.weights.store.load_component`); this module only supplies,
per component, its config class, its source -> ours mapping table (``dreamomni2_jax.convert.<name>.build_plan``)
and how to build the module. It sits above ``models/`` and ``convert/``, so neither imports the other's loader.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dreamomni2_jax.convert import clip as clip_table
from dreamomni2_jax.convert import flux2_transformer as flux2_table
from dreamomni2_jax.convert import flux_transformer as flux_table
from dreamomni2_jax.convert import qwen3 as qwen3_table
from dreamomni2_jax.convert import t5 as t5_table
from dreamomni2_jax.convert import vae as vae_table
from dreamomni2_jax.convert import vae_flux2 as vae_flux2_table
from dreamomni2_jax.models import flux, flux2, qwen3
from dreamomni2_jax.models.clip import CLIPConfig, CLIPTextModel
from dreamomni2_jax.models.flux import FluxConfig, FluxTransformer2DModel
from dreamomni2_jax.models.flux2 import Flux2Config, Flux2Transformer2DModel
from dreamomni2_jax.models.qwen3 import Qwen3Config, Qwen3Model
from dreamomni2_jax.models.t5 import T5Config, T5EncoderModel
from dreamomni2_jax.models.vae import VAE, VAEConfig
from dreamomni2_jax.models.vae_flux2 import AutoencoderKLFlux2, Flux2VAEConfig
from dreamomni2_jax.weights.store import load_component, replicated

ParamSharding = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def load_flux(path: str | Path, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
              param_sharding: ParamSharding | None = None, attention_impl: str = "xla", remat: str = "none",
              config: FluxConfig | None = None) -> FluxTransformer2DModel:
    """Load a Flux transformer, each param created directly with its sharding.

    ``path``: a converted checkpoint (``convert/flux_transformer.py`` OUT: Orbax + ``config.json``), or a source
    checkpoint (diffusers ``transformer/`` folder or BFL single ``.safetensors``) converted on the fly in memory.
    ``param_sharding(path, shape)``: sharding for the param at dotted ``path`` (e.g.
    ``"transformer_blocks.attn.to_q.kernel"``, ``shape`` including the leading layer axis); default replicated on
    ``mesh`` or on the first device. ``param_dtype`` defaults to ``dtype``.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    return load_component(
        path, config_cls=FluxConfig, build_plan=flux_table.build_plan, param_dtype=param_dtype,
        stacked=flux.stacked_counts, param_sharding=param_sharding or replicated(mesh), config=config, progress=True,
        make_model=lambda cfg: FluxTransformer2DModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                      attention_impl=attention_impl, remat=remat))


def load_flux2(path: str | Path, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
               param_sharding: ParamSharding | None = None, attention_impl: str = "xla", remat: str = "none",
               config: Flux2Config | None = None) -> Flux2Transformer2DModel:
    """Load a FLUX.2 transformer, each param created directly with its sharding (see :func:`load_flux`).

    ``path``: a converted folder (``convert/flux2_transformer.py`` OUT) or a diffusers ``transformer/`` folder /
    BFL single ``.safetensors`` converted on the fly in memory.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    return load_component(
        path, config_cls=Flux2Config, build_plan=flux2_table.build_plan, param_dtype=param_dtype,
        stacked=flux2.stacked_counts, param_sharding=param_sharding or replicated(mesh), config=config,
        make_model=lambda cfg: Flux2Transformer2DModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                       attention_impl=attention_impl, remat=remat))


def load_vae(path: str | Path, dtype=jnp.float32, *, param_sharding=None, attn_chunk: int = 4096) -> VAE:
    """Load a VAE with params and compute in ``dtype``.

    ``path``: a converted folder (``convert/vae.py`` OUT: ``config.json`` + Orbax ``params/``), or a source
    checkpoint (diffusers ``vae/`` folder or BFL ``ae.safetensors``) converted on the fly in memory.
    ``param_sharding(path, shape) -> Sharding`` places each param (default: replicated on the first device).
    """
    return load_component(path, config_cls=VAEConfig, build_plan=vae_table.build_plan, param_dtype=dtype,
                          param_sharding=param_sharding,
                          make_model=lambda cfg: VAE(cfg, dtype=dtype, param_dtype=dtype, attn_chunk=attn_chunk,
                                                     rngs=nnx.Rngs(0)))


def load_vae_flux2(path: str | Path, dtype=jnp.float32, *, param_sharding=None, attn_chunk: int = 4096
              ) -> AutoencoderKLFlux2:
    """Load a FLUX.2 VAE (params in ``dtype``; batch-norm statistics float32).

    ``path``: a converted folder (``convert/vae_flux2.py`` OUT), or a diffusers ``AutoencoderKLFlux2`` ``vae/`` folder or
    a BFL FLUX.2 ``ae.safetensors`` converted on the fly in memory.
    """
    return load_component(
        path, config_cls=Flux2VAEConfig, build_plan=vae_flux2_table.build_plan, param_dtype=dtype,
        param_sharding=param_sharding,
        make_model=lambda cfg: AutoencoderKLFlux2(cfg, dtype=dtype, param_dtype=dtype, attn_chunk=attn_chunk,
                                                  rngs=nnx.Rngs(0)))


def load_clip(path: str | Path, dtype=jnp.float32, *, param_sharding=None) -> CLIPTextModel:
    """Load the CLIP text encoder with params and matmuls in ``dtype``.

    ``path``: a converted folder (``convert/clip.py`` OUT: ``config.json`` + Orbax ``params/``) or a source
    transformers ``text_encoder/`` folder converted on the fly in memory.
    ``param_sharding(path, shape) -> Sharding`` places each param (default: replicated on the first device).
    """
    return load_component(path, config_cls=CLIPConfig, build_plan=clip_table.build_plan, param_dtype=dtype,
                          param_sharding=param_sharding,
                          make_model=lambda cfg: CLIPTextModel(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


def load_t5(path: str | Path, dtype=jnp.bfloat16, *, param_sharding=None) -> T5EncoderModel:
    """Load the T5 encoder with params and matmuls in ``dtype`` (``wo`` and norms stay float32).

    ``path``: a converted folder (``convert/t5.py`` OUT: ``config.json`` + Orbax ``params/``) or a source
    transformers ``text_encoder_2/`` folder converted on the fly in memory.
    ``param_sharding(path, shape) -> Sharding`` places each param (default: replicated on the first device).
    """
    return load_component(path, config_cls=T5Config, build_plan=t5_table.build_plan, param_dtype=dtype,
                          param_sharding=param_sharding,
                          make_model=lambda cfg: T5EncoderModel(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


def load_qwen3(path: str | Path, dtype=jnp.bfloat16, *, param_sharding=None) -> Qwen3Model:
    """Load the Qwen3 encoder with params and matmuls in ``dtype`` (norm scales float32).

    ``path``: a converted folder (``convert/qwen3.py`` OUT) or a transformers ``Qwen3ForCausalLM`` /
    ``Qwen3Model`` folder (klein ``text_encoder/``) converted on the fly in memory.
    """
    return load_component(path, config_cls=Qwen3Config, build_plan=qwen3_table.build_plan, param_dtype=dtype,
                          param_sharding=param_sharding, stacked=qwen3.stacked_counts,
                          make_model=lambda cfg: Qwen3Model(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
