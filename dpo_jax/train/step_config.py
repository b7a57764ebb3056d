"""Everything static about a train step (hashable, so it keys the jit): the model, the mode and its loss settings,
the batch layout, accumulation and the score window. Checked when built: an error names the config key."""

from __future__ import annotations

import dataclasses
from typing import Any

from dpo_jax.data.layout import PAIRS, Layout
from dpo_jax.models.config import ModelConfig
from dpo_jax.train import modes


@dataclasses.dataclass(frozen=True)
class StepConfig:
    model: ModelConfig
    mode: str = "dpo"  # a registered mode (train/modes.py): dpo, sft (Preferred-FT), unlikelihood, reward (BT)
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    loss_kwargs: tuple[tuple[str, Any], ...] = ()
    unlikelihood_alpha: float = 1.0
    center_rewards_coefficient: float = 0.0  # reward mode: TRL's c·(r_c + r_r)² term
    micro_batches: int = 1
    num_blocks: int = 1  # host blocks in the global batch (= process count)
    chunk_size: int = 128
    layout: Layout = PAIRS  # how pairs are rows (data/layout.py)
    # > 0: every row's scored tokens lie within this many positions (logprobs.py `window`); packed layout: every
    # row — or with score_groups, every group — has at most this many scored tokens (logprobs.py `positions`)
    score_window: int = 0
    # packed layout, > 0: the rows form this many groups of consecutive rows (the batch shards), each gathered as
    # one sequence (logprobs.py `rows_per_gather`); 0: each row alone. Planned by the loader with the window.
    score_groups: int = 0
    base_reference: bool = False  # LoRA: the reference is the same base with the adapters off, in the step
    seed: int = 0  # LoRA dropout: micro-batch m of step s drops with key fold_in(fold_in(key(seed), s), m)

    def __post_init__(self):
        mode = modes.get_mode(self.mode)
        if mode.head != self.model.head:
            needs = "reward model (score head)" if mode.head == "score" else "policy (language-model head)"
            raise ValueError(f"config.train.mode = {self.mode!r} needs a {needs}, but the model has a "
                             f"{self.model.head!r} head")
        mode.validate(self)
        if self.score_groups and self.micro_batches > 1:
            raise ValueError("score_groups gathers whole-batch row groups; with micro-batches each row is its own")
        if self.base_reference and not self.model.lora_rank:
            raise ValueError("config.dpo.reference = 'base' is the base model with the LoRA adapters off; it needs "
                             "config.model.lora.rank > 0")

    @property
    def needs_reference(self) -> bool:
        return modes.get_mode(self.mode).uses_reference(self)

    def batch_keys(self, train: bool = True) -> dict[str, int]:
        """Batch fields the step takes, with their ranks. An online mode's own fields come from its sampler, so its
        eval step (the data's pairs) takes the others only."""
        keys = {k: 2 for k in self.layout.row_keys} | {"example_mask": 1}
        if self.needs_reference and not self.base_reference:
            keys |= {"ref_chosen_logps": 1, "ref_rejected_logps": 1}
        mode = modes.get_mode(self.mode)
        return keys if mode.online and not train else keys | dict(mode.batch_keys)
