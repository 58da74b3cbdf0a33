"""Code behind commands that pull every stage together: ahead-of-time compiles, LoRA export of a run."""
