"""A throwaway local Slurm cluster for testing the TorchX Slurm path (local_cluster.py)."""
