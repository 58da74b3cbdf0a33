"""Convert a FLUX.2 VAE (diffusers ``AutoencoderKLFlux2`` ``vae/`` folder) to our Orbax format.

Command line only; the code is :mod:`dreamomni2_jax.convert.vae_flux2` (run ``--help`` for the options).
"""
import sys

from dreamomni2_jax.convert.vae_flux2 import main

if __name__ == "__main__":
    sys.exit(main())
