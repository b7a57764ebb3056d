"""Training: the pure jitted steps and their registered modes, the engine, the one loop (Trainer.fit), runs, run
directories, checkpoints, model and reference sources, export."""
