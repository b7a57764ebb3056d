"""dpo_jax: Direct Preference Optimization and the RLHF baselines in JAX/Flax.

Import the pieces from their modules (`dpo_jax.losses`, `dpo_jax.logprobs`, ...); importing the package itself is
cheap and pulls in no JAX.
"""

__version__ = "0.1.0"
