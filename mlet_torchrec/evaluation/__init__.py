"""Evaluation: scoring a model on a split and CTR metrics."""
