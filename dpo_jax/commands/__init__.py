"""The `dpo-jax` commands, one module each, on top of the library: each owns its config schema (`default_config()`)
and its entry (`main(config)`, or `run(argv)` for a plain-flags command). main.py dispatches; nothing below this
package imports it."""

from __future__ import annotations

import sys
from typing import Any, Callable

import ml_collections


def exits_on_run_error(fn: Callable[[ml_collections.ConfigDict], Any], name: str
                       ) -> Callable[[ml_collections.ConfigDict], None]:
    """`fn` as a command: a RunError (a run that stopped for a reason the user must act on) is printed and exits 1."""
    from dpo_jax.train.trainer import RunError

    def command(c: ml_collections.ConfigDict) -> None:
        try:
            fn(c)
        except RunError as e:
            print(f"dpo-jax {name}: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
    return command
