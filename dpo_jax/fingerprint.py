"""One short, stable hash for every cache key in the package (data caches, tokenizers, reference tables, the
sentiment experiment's stages): the same inputs give the same key on every machine and Python version."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj` as sorted-key JSON (non-JSON values by their `str`)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
