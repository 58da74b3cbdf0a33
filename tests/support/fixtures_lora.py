"""A PEFT LoRA on the tiny diffusers transformer, in the diffusers LoRA file layout (shared by the sampler tests,
single- and multi-device)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def peft_lora_file(tiny_pipeline_dir, tmp_path_factory):
    """A random (non-zero B) PEFT LoRA on the diffusers transformer, saved in the diffusers LoRA layout."""
    import torch
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_pretrained(tiny_pipeline_dir / "transformer")
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "proj_mlp", "ff.net.2"])
    transformer.add_adapter(cfg)
    with torch.no_grad():  # larger B so the LoRA visibly changes the image
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    out = tmp_path_factory.mktemp("lora")
    FluxKontextPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                          transformer_lora_adapter_metadata=cfg.to_dict())
    return out / "pytorch_lora_weights.safetensors"
