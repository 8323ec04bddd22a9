"""The CTR models on MLET embeddings, one module each; ``registry`` builds the configured one.

Importing this package imports no torch.
"""
