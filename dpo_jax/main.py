"""The `dpo-jax` command: `dpo-jax COMMAND [--config FILE[:ARG]] [--config.key=value ...]`.

A config command is a module with `default_config() -> ConfigDict` and `main(config)`: without `--config` the
built-in default is used, and `--config.key=value` overrides it either way (ml-collections; an unknown key is an
error, never ignored). A plain-flags command (`convert`) is a module with `run(argv)`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name: (module, function, summary); config commands' modules also have default_config()
    "experiment": ("dpo_jax.experiments", "", "run a paper experiment: `dpo-jax experiment sentiment` (§6.1)"),
    "train": ("dpo_jax.train.run", "main",
              "train (or resume) a run: DPO and relatives, SFT, unlikelihood, reward models"),
    "precompute": ("dpo_jax.train.run", "precompute_main", "build the data caches and reference log-probs only"),
    "eval": ("dpo_jax.train.run", "eval_main",
             "a run's latest checkpoint on the eval split; with config.winrate, win rates across temperatures"),
    "export": ("dpo_jax.train.export", "run", "a run's trained policy -> HF checkpoint (--run DIR --to-hf OUT)"),
    "convert": ("dpo_jax.convert.cli", "run", "HF checkpoint directory <-> dpo_jax model checkpoint"),
    "ppo": ("dpo_jax.rlhf.ppo_run", "main", "PPO from an SFT policy against a reward model or function (RLHF)"),
    "best-of-n": ("dpo_jax.rlhf.best_of_n_command", "main", "Best-of-N from a policy, ranked by a reward model"),
    "smoke": ("dpo_jax.smoke", "main", "toy DPO run on synthetic preferences: the loss math end to end, in seconds"),
}

EXPERIMENTS = {"sentiment": "dpo_jax.experiments.sentiment"}


def _usage() -> str:
    lines = ["usage: dpo-jax COMMAND [--config FILE[:ARG]] [--config.KEY=VALUE ...]", "", "commands:"]
    lines += [f"  {name:<11} {doc}" for name, (_, _, doc) in COMMANDS.items()]
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

    if command == "experiment":  # `dpo-jax experiment NAME [--config ...]`: NAME picks the module
        if len(argv) < 2 or argv[1] not in EXPERIMENTS:
            print(f"dpo-jax experiment: name one of {', '.join(EXPERIMENTS)}", file=sys.stderr)
            sys.exit(2)
        module = importlib.import_module(EXPERIMENTS[argv.pop(1)])
        _run_config_command(command, module, module.main, argv)
        return
    module_name, function, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    if not hasattr(module, "default_config"):  # a plain-flags command
        getattr(module, function)(argv[1:])
        return
    _run_config_command(command, module, getattr(module, function), argv)


def _run_config_command(command: str, module, entry, argv: list[str]) -> None:
    """Config-driven commands: `--config FILE[:ARG]` or the built-in default, then checked overrides."""
    import logging

    from absl import app, flags

    from dpo_jax.config import ConfigError, define_config_flag, split_config_args

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU here" noise on CPU/GPU
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
        try:
            entry(flags.FLAGS.config)
        except ValueError as e:  # bad config, data or checkpoint: the message names the key, file or line
            print(f"dpo-jax {command}: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=[f"dpo-jax {command}"] + argv[1:])


if __name__ == "__main__":
    run()
