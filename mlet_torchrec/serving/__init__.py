"""Serving: load a trained run, collapse W1 @ W2 into d-dim tables, export them."""
