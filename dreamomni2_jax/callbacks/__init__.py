"""Callbacks of the training loop: checkpoint saves, validation grids, held-out previews and loss."""
