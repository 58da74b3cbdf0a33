"""The manifest of a ``convert/pipeline.py`` output folder: which components, which family."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dreamomni2_jax.config import read_json

MANIFEST = "manifest.json"
FORMAT = "dreamomni2-jax-converted-pipeline"
PIPELINE_CLASSES = ("FluxKontextPipeline", "FluxPipeline", "Flux2KleinPipeline")


@dataclass(frozen=True)
class Component:
    name: str
    library: str  # model_index.json library
    class_name: str  # model_index.json class and the component config's _class_name / architectures
    config_file: str | None  # file whose class is checked (None: tokenizer, checked by files)
    converter: str | None  # "convert.<module>" or None for a copied folder
    big: bool = False  # uses --dtype (else --small-dtype)
    aliases: tuple[str, ...] = ()  # other model_index.json classes that load the same files (slow/fast
    # tokenizers, transformers 5 renames)

    @property
    def classes(self) -> tuple[str, ...]:
        return (self.class_name, *self.aliases)


COMPONENTS = (
    Component("transformer", "diffusers", "FluxTransformer2DModel", "config.json", "flux_transformer", big=True),
    Component("vae", "diffusers", "AutoencoderKL", "config.json", "vae"),
    Component("text_encoder", "transformers", "CLIPTextModel", "config.json", "clip"),
    Component("text_encoder_2", "transformers", "T5EncoderModel", "config.json", "t5", big=True),
    Component("tokenizer", "transformers", "CLIPTokenizer", None, None, aliases=("CLIPTokenizerFast",)),
    Component("tokenizer_2", "transformers", "T5TokenizerFast", None, None, aliases=("T5Tokenizer",)),
    Component("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler", "scheduler_config.json", None),
)

KLEIN_COMPONENTS = (
    Component("transformer", "diffusers", "Flux2Transformer2DModel", "config.json", "flux2_transformer", big=True),
    Component("vae", "diffusers", "AutoencoderKLFlux2", "config.json", "vae_flux2"),
    Component("text_encoder", "transformers", "Qwen3ForCausalLM", "config.json", "qwen3", big=True),
    Component("tokenizer", "transformers", "Qwen2TokenizerFast", None, None, aliases=("Qwen2Tokenizer",)),
    Component("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler", "scheduler_config.json", None),
)
# model_index.json _class_name -> (model family recorded in the manifest, components)
FAMILIES = {"FluxKontextPipeline": ("flux1", COMPONENTS), "FluxPipeline": ("flux1", COMPONENTS),
            "Flux2KleinPipeline": ("flux2-klein", KLEIN_COMPONENTS)}


def is_converted_pipeline(path: str | Path) -> bool:
    """True if ``path`` is a complete ``convert/pipeline.py`` output."""
    return read_manifest(path) is not None


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a converted pipeline folder, or None when ``path`` is not one (or is incomplete)."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None

    m = read_json(p)  # a damaged manifest is an error naming it, not a traceback
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def read_family(path: str | Path) -> str:
    """Model family of a converted pipeline folder: ``"flux1"`` or ``"flux2-klein"`` (manifests written before the
    family was recorded are FLUX.1). Raises ``ValueError`` when ``path`` is not a complete converted folder."""
    m = read_manifest(path)
    if m is None:
        raise ValueError(f"{path}: not a converted pipeline folder (no {MANIFEST}; run convert/pipeline.py)")
    return m.get("family", "flux1")
