"""Config files and command-line overrides, through ml_collections' config_flags.

Configs are Python files with `get_config(arg=None) -> ConfigDict` (big_vision style, `path.py:arg`), loaded by
`config_flags.DEFINE_config_file`; a command without `--config` uses its built-in `default_config()` through
`DEFINE_config_dict`. Overrides are `--config.a.b=value`, applied and locked by config_flags. What is ours is the
messages: every override key is checked against the config before anything runs, so a typo is an error that names
the key and the closest valid one, and a broken config file is an error that names the file.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Iterable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message names the file or key."""


def load_config_file(spec: str | None, default: Callable[[], ml_collections.ConfigDict] | None = None
                     ) -> ml_collections.ConfigDict:
    """The config of `path/to/config.py[:arg]` (its `get_config(arg)`, loaded by config_flags as `--config` would
    load it), or `default()` without a spec; before overrides."""
    flag_values = flags.FlagValues()
    if spec is None:
        config_flags.DEFINE_config_dict("config", default(), flag_values=flag_values, sys_argv=[])
        return flag_values["config"].value
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    # config_flags imports every file as the module `config_config` with importlib's load_module, which reuses a
    # module of that name: a second file without get_config would silently get the first file's.
    sys.modules.pop("config_config", None)
    try:
        config_flags.DEFINE_config_file("config", spec, flag_values=flag_values, lock_config=False, sys_argv=[])
    except (flags.IllegalFlagValueError, AttributeError) as e:
        reason = str(e).strip().splitlines()[-1]
        if "has no attribute 'get_config'" in reason:
            raise ConfigError(f"config file {path!r} has no get_config(arg=None) function") from None
        raise ConfigError(f"config file {path!r}: {reason}") from None
    config = flag_values["config"].value
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path!r}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def define_config_flag(spec: str | None, default: Callable[[], ml_collections.ConfigDict], keys: Iterable[str],
                       argv: Sequence[str],
                       flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--config` on `flag_values`: DEFINE_config_file for the file `spec`, else DEFINE_config_dict for
    `default()`. `keys` (the override keys in `argv`, the command line without `--config FILE`) are checked against
    the config first (ConfigError naming the key and the closest valid one); config_flags then registers, applies
    and locks the overrides when absl parses argv."""
    base = load_config_file(spec, default)
    check_override_keys(base, keys)
    if spec is None:
        config_flags.DEFINE_config_dict("config", base, "the command's built-in config", flag_values=flag_values,
                                        lock_config=True, sys_argv=list(argv))
    else:
        sys.modules.pop("config_config", None)
        config_flags.DEFINE_config_file("config", spec, "a config file, path.py[:arg]", flag_values=flag_values,
                                        lock_config=True, sys_argv=list(argv))


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
