"""Former name of ``convert/vae_flux2.py`` (the FLUX.2 VAE converter); same options."""
import sys

from dreamomni2_jax.convert.vae_flux2 import main

if __name__ == "__main__":
    sys.exit(main())
