"""Tiny random models in the real diffusers / transformers on-disk layouts (tests and demos; need the ``ref`` extra)."""
