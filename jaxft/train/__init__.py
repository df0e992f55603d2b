"""Training: optimizer, state, the jitted step, checkpoints and the host loop."""
