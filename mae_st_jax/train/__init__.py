"""Training: optimiser and schedules, sharding, checkpoints, the jitted step and the loops."""
