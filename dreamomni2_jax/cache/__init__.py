"""The cache stage: training inputs, the record format, the VAE / text encoders, the optional VLM enhancer."""
