"""dpo-jax smoke --config configs/smoke.py[:ARG]

Expected: first-step loss 0.693147 (= ln 2, policy == reference), rewards/accuracies 1.000 by step 50, the
probability of a preferred next token rising from 0.493 to 1.000 (KL 0.80 nats), and "smoke run OK"; about 10 s
on 2 CPU cores, most of it compiling.

A toy DPO run through the engine, the reference pass and Trainer.fit (see dpo_jax/commands/smoke.py). ARG picks a
loss from the registry, e.g. `configs/smoke.py:ipo`; any field can be overridden, e.g. `--config.dpo.beta=0.5
--config.steps=50`.
"""

from dpo_jax.commands.smoke import default_config


def get_config(arg=None):
    config = default_config()
    if arg:
        config.dpo.loss_type = arg
    return config
