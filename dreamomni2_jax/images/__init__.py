"""Image files and sizes: decoding, the Kontext size policy, sampling references, validation grids."""
