"""LoRA / DoRA adapters: layers injected into a model, attaching them, LoRA files (diffusers/PEFT, kohya)."""
