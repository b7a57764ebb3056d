"""One decoder-only transformer for every supported HF family, plus sampling."""
