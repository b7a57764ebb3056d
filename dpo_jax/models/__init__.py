"""One decoder-only transformer for every supported HF family (with LoRA adapters and a reward model's score head),
plus sampling."""
