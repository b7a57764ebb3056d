"""The `dpo-jax` command: `dpo-jax COMMAND [--config FILE[:ARG]] [--config.key=value ...]`.

Each command is a module of dpo_jax/commands/. A config command has `default_config() -> ConfigDict` and
`main(config)`: without `--config` the built-in default is used, and `--config.key=value` overrides it either way
(ml-collections; an unknown key is an error, never ignored). A config command may add its own flags
(`define_flags()`: plan's --topology). A plain-flags command (`convert`, `export`) has `run(argv)`.
`experiment NAME` picks its config and module from commands/experiment.py.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name: (module under dpo_jax/commands/, summary)
    "experiment": ("experiment", "run a paper experiment: `dpo-jax experiment sentiment` (§6.1)"),
    "train": ("train", "train (or resume) a run: DPO and relatives, SFT, unlikelihood, reward models"),
    "precompute": ("precompute", "build the data caches and reference log-probs only"),
    "eval": ("evaluate", "a run's latest checkpoint on the eval split; with config.winrate, win rates across "
             "temperatures"),
    "export": ("export", "a run's trained policy -> HF checkpoint or PEFT adapter (--run DIR --to-hf OUT)"),
    "convert": ("convert", "HF checkpoint directory <-> dpo_jax model checkpoint"),
    "ppo": ("ppo", "PPO from an SFT policy against a reward model or function (RLHF)"),
    "best-of-n": ("best_of_n", "Best-of-N from a policy, ranked by a reward model"),
    "judge-agreement": ("judge_agreement", "a judge's agreement with human labels (and humans' with each other) "
                        "and its position bias, before trusting its win rates"),
    "smoke": ("smoke", "toy DPO run on synthetic preferences: the loss math end to end, in seconds"),
    "plan": ("plan", "compile a train config for a TPU topology on this host: fits?, memory, estimated time"),
}


def _usage() -> str:
    lines = ["usage: dpo-jax COMMAND [--config FILE[:ARG]] [--config.KEY=VALUE ...]", "", "commands:"]
    lines += [f"  {name:<15} {doc}" for name, (_, doc) in COMMANDS.items()]
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

    module = importlib.import_module(f"dpo_jax.commands.{COMMANDS[command][0]}")
    if command == "experiment":  # `dpo-jax experiment NAME [--config ...]`: NAME picks the config and the module
        try:
            config_module, experiment = module.resolve(argv.pop(1) if len(argv) > 1 else "")
        except ValueError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
        _run_config_command(command, config_module, experiment.main, argv)
        return
    if not hasattr(module, "default_config"):  # a plain-flags command
        module.run(argv[1:])
        return
    _run_config_command(command, module, module.main, argv)


def _run_config_command(command: str, module, entry, argv: list[str]) -> None:
    """Config-driven commands: `--config FILE[:ARG]` or the built-in default, then checked overrides."""
    import logging

    from absl import app, flags

    from dpo_jax.config import ConfigError, define_config_flag, split_config_args

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU here" noise on CPU/GPU
    if hasattr(module, "define_flags"):  # a command's own flags beside --config (plan: --topology, ...)
        module.define_flags()
    try:
        spec, keys, argv = split_config_args(argv)
        define_config_flag(spec, module.default_config, keys, argv)
    except ConfigError as e:
        print(f"dpo-jax {command}: {e}", file=sys.stderr)
        sys.exit(2)

    def _main(rest: list[str]) -> None:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/TFDS INFO lines would bury the run's own output
        if len(rest) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
        from dpo_jax import compile_cache

        compile_cache.configure(compile_cache.cache_dir_of(flags.FLAGS.config))  # on unless the user turned it off
        try:
            entry(flags.FLAGS.config)
        except ValueError as e:  # bad config, data or checkpoint: the message names the key, file or line
            print(f"dpo-jax {command}: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=[f"dpo-jax {command}"] + argv[1:])


if __name__ == "__main__":
    run()
