"""Strings users write in configs and flags, parsed with errors that name where they came from: `module:name`
callables and byte sizes. Below every layer, so commands and libraries share them."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
from typing import Callable

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def load_callable(spec: str, key: str = "config.reward.function") -> Callable:
    """`module:name` or `path/to/file.py:name` -> the callable; errors name `key`, the config key it came from."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"{key} = {spec!r}: expected 'module:name' or 'file.py:name'")
    if where.endswith(".py"):
        file_spec = importlib.util.spec_from_file_location(f"_user_{abs(hash(where))}", where)
        if file_spec is None or not os.path.isfile(where):
            raise ValueError(f"{key}: no file {where!r}")
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not callable(getattr(module, name, None)):
        raise ValueError(f"{key} = {spec!r}: {where} has no callable {name!r}")
    return getattr(module, name)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' -> bytes (an argparse type: a bad size is a usage error)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
