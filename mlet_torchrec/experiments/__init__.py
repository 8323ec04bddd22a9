"""Experiments: sweeps over configs, their reports and statistics, and the demo."""
