"""dpo_jax: Direct Preference Optimization and the RLHF baselines in JAX/Flax, TPU-first."""

from setuptools import find_packages, setup

setup(
    name="dpo_jax",
    version="0.1.0",
    description="Direct Preference Optimization (and the RLHF pipeline it replaces) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dpo_jax", "dpo_jax.*"]),
    install_requires=[
        "jax>=0.5.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "transformers>=4.45",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=0.1.1",
        "safetensors>=0.4.3",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "importlib_resources>=6.0",
        "absl-py>=2.0",
        "vaderSentiment==3.3.2",  # the sentiment experiment's ground-truth reward (its lexicon is version-specific)
        "matplotlib>=3.8",  # the sentiment experiment's frontier plot
    ],
    extras_require={
        # torch is pinned: an unpinned torch pulls a multi-GB CUDA build. Tests only; runtime never imports it (nor
        # peft: the LoRA adapter round trip is tested against it). jax[tpu]: the plan and kernel tests compile for a
        # TPU topology.
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=4.45", "peft==0.21.2", "jax[tpu]"],
        # the TPU compiler (libtpu, at the installed jax's version): what `dpo-jax plan` compiles with, no TPU needed;
        # on a TPU VM, what runs
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["dpo-jax=dpo_jax.main:run"]},
)
