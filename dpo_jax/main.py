"""The `dpo-jax` command: `dpo-jax COMMAND [--config FILE[:ARG]] [--config.key=value ...]`.

A config command is a module with `default_config() -> ConfigDict` and `main(config)`: without `--config` the
built-in default is used, and `--config.key=value` overrides it either way (ml-collections; an unknown key is an
error, never ignored). A plain-flags command (`convert`) is a module with `run(argv)`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "smoke": ("dpo_jax.smoke", "toy DPO run on synthetic preferences: the foundation end to end, in seconds"),
    "convert": ("dpo_jax.convert.cli", "HF checkpoint directory <-> dpo_jax model checkpoint (--help for flags)"),
}


def _usage() -> str:
    lines = ["usage: dpo-jax COMMAND [--config FILE[:ARG]] [--config.KEY=VALUE ...]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv.pop(1)
    if command not in COMMANDS:
        print(f"dpo-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)

    module = importlib.import_module(COMMANDS[command][0])
    if not hasattr(module, "default_config"):  # a plain-flags command
        module.run(argv[1:])
        return
    _run_config_command(command, module, argv)


def _run_config_command(command: str, module, argv: list[str]) -> None:
    """Config-driven commands: `--config FILE[:ARG]` or the built-in default, then checked overrides."""
    import logging

    from absl import app
    from ml_collections import config_flags

    from dpo_jax.config import ConfigError, check_override_keys, load_config_file, split_config_args

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU here" noise on CPU/GPU
    try:
        spec, keys, argv = split_config_args(argv)
        config = load_config_file(spec) if spec else module.default_config()
        check_override_keys(config, keys)
    except ConfigError as e:
        print(f"dpo-jax {command}: {e}", file=sys.stderr)
        sys.exit(2)
    argv = [f"dpo-jax {command}"] + argv[1:]
    holder = config_flags.DEFINE_config_dict("config", config, "the resolved config", sys_argv=argv)

    def _main(rest: list[str]) -> None:
        if len(rest) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
        try:
            module.main(holder.value)
        except ConfigError as e:
            print(f"dpo-jax {command}: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    run()
