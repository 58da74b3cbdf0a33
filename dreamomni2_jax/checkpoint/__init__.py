"""Run state on disk: Orbax checkpoints (exact resume) and the run directory (lock, branches, metrics)."""
