"""The CTR models on MLET embeddings: one network module per model here, its config in ``configs/`` (torch-free).

Importing this package imports no torch: ``registry`` builds a model by its config's name.
"""
