"""Training batches: the Grain stream over a cache (or synthetic batches), loss masks, reference dropout."""
