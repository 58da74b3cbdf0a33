"""Tiny CPU demo of FLUX.2 [klein]: trains a LoRA on the tiny random klein pipeline and data that `make demo-klein`
generates (the same chain as `make demo`; the model family comes from the converted folder).

    make demo-klein                            # does everything below
    python scripts/train.py --config configs/klein_demo.py \
        --set model.path=demo_klein_out/model --set data.cache_dir=demo_klein_out/cache \
        --set train.run_dir=demo_klein_out/run

Paths are under ``$DREAMOMNI2_DEMO_OUT`` (default ``demo_klein_out``; ``scripts/demo.py --family klein`` sets it).
"""
import os

from dreamomni2_jax.config import Config, override
from dreamomni2_jax.config_common import tiny_demo

# FLUX.2 module paths (stacked blocks: no layer index): every attention projection of the double blocks, and the
# single blocks' fused QKV + MLP input projection and output projection.
KLEIN_ATTENTION = (r"attn\.to_q$", r"attn\.to_k$", r"attn\.to_v$", r"attn\.to_out", r"attn\.add_[qkv]_proj",
                   r"attn\.to_add_out", r"attn\.to_qkv_mlp_proj")


def get_config() -> Config:
    out = os.environ.get("DREAMOMNI2_DEMO_OUT", "demo_klein_out")
    return override(tiny_demo(out, size=64), lora=dict(preset="custom", targets=KLEIN_ATTENTION),
                    sample=dict(guidance=4.0))
