"""Config files and command-line overrides.

Configs are Python files with `get_config(arg=None) -> ConfigDict` (big_vision style, `path.py:arg`). Overrides
are `--config.a.b=value`; every key is checked against the config before anything runs, so a typo is an error that
names the key and the closest valid one instead of a traceback or, worse, a silently ignored setting.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
from typing import Iterable

import ml_collections


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message names the file or key."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_dpo_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"config file {path!r} has no get_config(arg=None) function")
    takes_arg = bool(inspect.signature(get_config).parameters)
    if arg and not takes_arg:
        raise ConfigError(f"config file {path!r}: get_config() takes no argument, but {arg!r} was given")
    config = get_config(arg or None) if takes_arg else get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path!r}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _all_keys(v, prefix + k + ".")
    return keys


def check_override_keys(config: ml_collections.ConfigDict, keys: Iterable[str], flag: str = "config") -> None:
    """Raises ConfigError for the first dotted key that the config does not have, suggesting the closest."""
    valid = _all_keys(config)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean --{flag}.{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key --{flag}.{key}{hint}")


def split_config_args(argv: list[str], flag: str = "config") -> tuple[str | None, list[str], list[str]]:
    """Pulls `--config FILE` / `--config=FILE` out of argv; returns (file spec, override keys, remaining argv)."""
    spec, rest, keys = None, [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == f"--{flag}":
            if i + 1 >= len(argv):
                raise ConfigError(f"--{flag} needs a value: a config file, path.py[:arg]")
            spec = argv[i + 1]
            i += 2
            continue
        if a.startswith(f"--{flag}="):
            spec = a.split("=", 1)[1]
        else:
            if a.startswith(f"--{flag}."):
                keys.append(a[len(flag) + 3:].split("=", 1)[0])
            rest.append(a)
        i += 1
    return spec, keys, rest


def parse_arg(arg: str | None, defaults: dict[str, str], where: str) -> dict[str, str]:
    """`get_config(arg)` variants as 'key=value,key=value' (e.g. configs/dpo_hh.py:model=pythia-2.8b)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(f"{where}: bad config argument {item!r}; expected key=value with key in "
                              f"{sorted(defaults)}")
        out[key] = value
    return out
