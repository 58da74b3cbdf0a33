"""Prompt encoding: FLUX.1 (CLIP pooled + T5) and FLUX.2 [klein] (Qwen3 hidden states)."""
