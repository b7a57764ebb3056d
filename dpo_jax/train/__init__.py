"""Train state, the pure jitted train/eval steps, and (later) the loop and checkpoints."""
