"""Tiny CPU demo of FLUX.2 [klein]: trains a LoRA on the tiny random klein pipeline and data that `make demo-klein`
generates (the same chain as `make demo`; the model family comes from the converted folder).

    make demo-klein                            # does everything below
    python scripts/train.py --config configs/klein_demo.py \
        --set model.path=demo_klein_out/model --set data.cache_dir=demo_klein_out/cache \
        --set train.run_dir=demo_klein_out/run

Paths are under ``$DREAMOMNI2_DEMO_OUT`` (default ``demo_klein_out``; ``scripts/demo.py --family klein`` sets it).
"""
import os

from dreamomni2_jax.config import (CheckpointConfig, Config, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, SampleConfig, TrainConfig, ValidationSample)

# FLUX.2 module paths (stacked blocks: no layer index): every attention projection of the double blocks, and the
# single blocks' fused QKV + MLP input projection and output projection.
KLEIN_ATTENTION = (r"attn\.to_q$", r"attn\.to_k$", r"attn\.to_v$", r"attn\.to_out", r"attn\.add_[qkv]_proj",
                   r"attn\.to_add_out", r"attn\.to_qkv_mlp_proj")


def get_config() -> Config:
    out = os.environ.get("DREAMOMNI2_DEMO_OUT", "demo_klein_out")
    return Config(
        model=ModelConfig(path=f"{out}/model", param_dtype="float32", compute_dtype="float32", attention="auto",
                          remat="none"),
        lora=LoraConfig(rank=4, alpha=4.0, preset="custom", targets=KLEIN_ATTENTION, init="gaussian"),
        data=DataConfig(cache_dir=f"{out}/cache", batch_size=2, max_refs=3, target_max_area=64 * 64,
                        reference_max_area=64 * 64, min_image_size=32, batching="pad", num_workers=0,
                        max_sequence_length=32, synthetic_resolution=(64, 64), synthetic_refs=((64, 64), (48, 64))),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", grad_clip=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed="off"),
        checkpoint=CheckpointConfig(every_steps=5, max_to_keep=2, async_save=False),
        sample=SampleConfig(steps=4, guidance=4.0, every_steps=10, validation=(
            ValidationSample(prompt="put the hat from image 2 on the person in image 1",
                             references=(f"{out}/data/img/s1_ref0.png", f"{out}/data/img/s1_ref1.png"),
                             seed=0, height=64, width=64),)),
        train=TrainConfig(run_dir=f"{out}/run", steps=20, seed=0, timestep_sampling="uniform", log_every=1),
    )
