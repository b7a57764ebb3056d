"""Preference data: format readers, tokenization, TFDS storage and the fixed-shape, resumable loader."""
