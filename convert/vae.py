"""Convert a Flux VAE (diffusers ``vae/`` folder or BFL ``ae.safetensors``) to our Orbax format.

Command line only; the code is :mod:`dreamomni2_jax.convert.vae` (run ``--help`` for the options).
"""
import sys

from dreamomni2_jax.convert.vae import main

if __name__ == "__main__":
    sys.exit(main())
