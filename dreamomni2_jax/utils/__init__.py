"""Small shared helpers with no model knowledge: atomic writes, dtype names, dotted tree paths, digests, TensorBoard."""
