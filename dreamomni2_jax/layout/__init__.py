"""Token layout and position ids: latents as 2x2-patch tokens, FLUX.1 (3 axes) and FLUX.2 [klein] (4 axes) ids."""
