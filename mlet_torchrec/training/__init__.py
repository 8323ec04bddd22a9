"""Training: distributed setup, sharding, optimizers, the loop, its state and checkpoints."""
