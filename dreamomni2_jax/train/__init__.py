"""Training: the jitted step, the loop, optimizers, EMA, training sigmas, FLOPs / MFU, preemption."""
