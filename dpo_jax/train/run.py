"""A run: its config -> its parts (`build_run`) -> the one loop (`Trainer.fit`); the library of `dpo-jax train |
precompute | eval` (commands/).

Resume is automatic: if the run directory holds a checkpoint, training continues from it exactly (state, loader
position, partial logging window), and the logs are cut back to that step (train/run_dir.py). SIGTERM (TPU
preemption) finishes the current step, saves and exits 0. A non-finite loss or gradient stops the run naming the
step and example ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

from dpo_jax import distributed
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.data.pipeline import build_loaders, default_data_config
from dpo_jax.data.tokenizers import load_tokenizer
from dpo_jax.distributed import default_distributed_config
from dpo_jax.flops import peak_tflops
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.sharding import abstract, data_parallel_size, make_mesh
from dpo_jax.train.compile_ahead import CompileAhead
from dpo_jax.train.engine import Engine, build_engine, default_engine_config
from dpo_jax.train.evaluation import evaluate_split, sample_completions, sample_prompts
from dpo_jax.train.model_source import default_model_config, for_mode, model_loader, tokenizer_dir
from dpo_jax.train.modes import get_mode
from dpo_jax.train.online_config import default_iterative_config, default_online_config
from dpo_jax.train.reference_source import NO_REFERENCE, SyncedReference, prepare_reference
from dpo_jax.train.run_dir import RunDirectory
from dpo_jax.train.trainer import Trainer


def default_run_config() -> ml_collections.ConfigDict:
    c = default_engine_config()
    c.model = default_model_config()
    c.reference = ml_collections.ConfigDict({"source": "", "path": ""})  # empty: the initial policy
    c.data = default_data_config()
    c.distributed = default_distributed_config()
    t = c.train
    t.steps = 100
    t.log_every = 10
    t.eval_every = 0  # 0: only at the end (when there is an eval split)
    t.save_every = 50
    t.keep_checkpoints = 2
    t.run_dir = "runs/default"
    t.eval_samples = 0  # K completions for fixed eval prompts, from the policy (and once from the reference)
    t.sample_max_new_tokens = 32
    t.sample_temperature = 1.0
    t.peak_tflops_per_device = 0.0  # for MFU; 0: from the device kind when known (TPU v4/v5/v6, H100/H200, A100)
    t.tensorboard = True
    c.online = default_online_config()  # train.mode = online_dpo: sampling and scoring (rlhf/online_dpo.py)
    c.iterative = default_iterative_config()  # rounds > 0: iterative DPO (rlhf/iterative_dpo.py)
    return c


@dataclasses.dataclass
class Run:
    """A run's parts, built once from the config and resumed from the run directory when it holds a checkpoint."""

    config: ml_collections.ConfigDict
    tokenizer: Any
    loaders: dict[str, PreferenceLoader]
    engine: Engine
    state: Any  # the train state to start from (initial or restored)
    start: int  # the step it is at
    window: dict | None  # a restored partial logging window
    reference: Any  # train/reference_source.py: attaches reference log-probs to host batches
    directory: RunDirectory  # checkpoints, logs (directory.writer), config files
    prompts: tuple | None  # fixed eval prompts for samples

    @property
    def model(self) -> ModelConfig:
        return self.engine.config.model

    @property
    def writer(self):
        return self.directory.writer

    def evaluate(self, step: int, state: Any) -> None:
        self.writer.scalars(step, "eval", evaluate_split(self.engine, state.params, self.loaders["eval"],
                                                         self.reference))
        if self.prompts is not None:
            self.writer.samples(step, "policy", self.samples(state.params))

    def samples(self, params: Any) -> list[dict[str, str]]:
        t = self.config.train
        sampling = SamplingConfig(max_new_tokens=t.sample_max_new_tokens, temperature=t.sample_temperature,
                                  eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id or 0)
        return sample_completions(params, self.model, self.prompts, self.tokenizer, sampling, t.seed)

    def close(self) -> None:
        self.directory.close()
        for loader in self.loaders.values():
            loader.close()


def batch_report(train: PreferenceLoader, processes: int) -> str:
    """One line: the batch a step gets — requested against realized pairs for a token budget."""
    if not train.budget:
        return f"batch: {train.global_batch} pairs a step (config.train.exact_pairs or an unpacked layout)"
    rows = f"{train.planned_rows * processes} packed rows of {train.buckets[0]} tokens"
    if train.budget == "explicit":
        how = f"config.train.global_batch_tokens = {train.global_batch_tokens}"
    else:
        how = (f"derived from the data for config.train.global_batch_pairs = {train.global_batch}; "
               "config.train.exact_pairs = True keeps exactly that many")
    return (f"batch: a token budget of {rows} a step ({how}): requested {train.global_batch} pairs a step, "
            f"realized {train.mean_pairs(0):.2f} on average over epoch 0")


def build_run(c: ml_collections.ConfigDict, compile_train_step: bool = False) -> Run:
    """Processes -> tokenizer and model source -> mesh -> input -> engine -> resume -> reference -> evals."""
    # ----- processes and run directory
    distributed.initialize(c.distributed)
    main = distributed.is_main_process()
    directory = RunDirectory(c.train.run_dir, keep_checkpoints=c.train.keep_checkpoints,
                             tensorboard=c.train.tensorboard)

    # ----- tokenizer and model source
    tokenizer = load_tokenizer(c.data, tokenizer_dir(c.model))
    model, load_initial = for_mode(c.model, c.train.mode, *model_loader(c.model, len(tokenizer)), tokenizer)
    if model.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model.vocab_size}")

    # ----- mesh and input
    mesh = make_mesh(c.mesh)
    restored = directory.restore_extra(model=model, kind=c.train.mode)
    loaders = build_loaders(c.data, global_batch_pairs=c.train.global_batch_pairs, seed=c.train.seed,
                            data_parallel_size=data_parallel_size(mesh, c.mesh.rules),
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            tokenizer=tokenizer, train_state=None if restored is None else restored[0],
                            micro_batches=c.train.micro_batches, steps=c.train.steps,
                            global_batch_tokens=c.train.global_batch_tokens, exact_pairs=c.train.exact_pairs)
    if main:
        print(batch_report(loaders["train"], jax.process_count()), flush=True)
    windows = [loader.score_window for loader in loaders.values()]
    window = max(windows) if all(windows) else 0  # one step serves every split; 0: a split has no window
    if get_mode(c.train.mode).online and window:  # the step also scores sampled completions (pairs layout)
        window = max(window, -(-c.online.max_new_tokens // 8) * 8)
    groups = {loader.score_groups for loader in loaders.values()}  # built alike: the same for every split
    if len(groups) != 1:
        raise RuntimeError(f"the splits' loaders planned different score groups {sorted(groups)}")
    groups = groups.pop()
    if window and main:
        where = f"each of {groups} groups of packed rows (one per batch shard)" if groups else "per row"
        print(f"score window: the unembedding runs on at most {window} positions {where} (planned from the data's "
              "scored tokens)", flush=True)

    # ----- model, optimizer and sharded state
    layout = loaders["train"].layout  # the packed layout's K is the most pairs a planned row holds
    if c.model.source == "random":  # initialised inside the sharded jit: born on its devices
        engine = build_engine(c, model, load_initial, mesh=mesh, layout=layout, score_window=window,
                              score_groups=groups)
    else:  # loaded on the host, then donated into the sharded state
        engine = build_engine(c, model, lambda p: p, load_initial(), mesh=mesh, layout=layout, score_window=window,
                              score_groups=groups)
    state, initial_params, start, log_window = engine.state, engine.state.params, 0, None

    # ----- resume
    if restored is not None:
        state = directory.resume(engine.state)
        engine = engine._replace(state=state)  # never hand out the deleted initial state
        initial_params, start, log_window = None, directory.latest, restored[1]
    directory.write_configs(c, model)  # only now: a run refused by its checkpoint must not overwrite its files

    # ----- reference log-probs, while the train step compiles
    train = loaders["train"]
    first = train.batch_at(int(train.state.epoch), int(train.state.step))
    compiling = CompileAhead(engine.train_step, abstract(state), engine.abstract_batch(first)) \
        if compile_train_step and start < c.train.steps else None
    reference = prepare_reference(c, engine, loaders, initial_params, load_initial, directory.path)
    if compiling is not None:
        compiling.wait()

    # ----- evals
    if c.train.eval_samples and model.head != "lm":
        raise ValueError("config.train.eval_samples > 0 samples completions from a policy; a reward model cannot "
                         "sample (set it to 0)")
    prompts = sample_prompts(loaders.get("eval"), c.train.eval_samples, tokenizer.pad_token_id or 0) \
        if c.train.eval_samples else None
    return Run(c, tokenizer, loaders, engine, state, start, log_window, reference, directory, prompts)


def check_reference_sync(c: ml_collections.ConfigDict) -> None:
    """TR-DPO's reference updates need a resident reference: refused, saying why, for tables and for LoRA's base."""
    every = c.dpo.ref_sync_every
    if every and c.dpo.reference != "per_batch":
        raise ValueError(f"config.dpo.ref_sync_every = {every} moves the reference during training, which needs "
                         f"config.dpo.reference = 'per_batch' (a resident copy); got {c.dpo.reference!r}: precomputed "
                         "tables are fixed log-probs of the initial policy, and 'base' is LoRA's frozen base")


def train(c: ml_collections.ConfigDict, make_rollout: Callable[[Run, Any], Callable] | None = None
          ) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged train metrics. make_rollout(run, reference): the
    Trainer's rollout hook, given the run and its reference (attach(local, split, state)) — online DPO's sampler;
    TR-DPO's reference sync (config.dpo.ref_sync_every) goes through the same hook."""
    check_reference_sync(c)
    online = get_mode(c.train.mode).online
    if online and make_rollout is None:
        raise ValueError("config.train.mode = 'online_dpo' samples its pairs: run it with `dpo-jax train` "
                         "(commands/train.py), which adds the sampler")
    run = build_run(c, compile_train_step=not online)
    t = c.train
    try:
        if run.prompts is not None and run.start == 0:
            ref = run.reference.params if run.reference.params is not None else run.state.params
            run.writer.samples(0, "reference", run.samples(ref))
        reference, rollout = run.reference, None
        if c.dpo.ref_sync_every:
            reference = SyncedReference(run.reference, c.dpo.ref_sync_every, c.dpo.ref_sync_alpha)
            if run.start:  # the moved reference as saved with the checkpoint (before any move at that step)
                reference.inner.params = run.directory.checkpoints.restore_reference(
                    run.start, abstract(reference.params))
        if make_rollout is not None:
            rollout = make_rollout(run, reference)
        elif reference is not run.reference:
            def rollout(local, state):
                return reference.attach(local, "train", state)
        trainer = Trainer(run.engine, steps=t.steps, reference=run.reference if rollout is None else NO_REFERENCE,
                          writer=run.writer, log_every=t.log_every, checkpoints=run.directory.checkpoints,
                          save_every=t.save_every, rollout=rollout,
                          moving_reference=(lambda: reference.params) if c.dpo.ref_sync_every else None,
                          eval_every=t.eval_every, evaluate=run.evaluate if "eval" in run.loaders else None,
                          peak_tflops=t.peak_tflops_per_device or peak_tflops(jax.devices()[0].device_kind))
        _, last = trainer.fit(run.state, run.loaders["train"], start=run.start, window=run.window)
        if run.start >= t.steps and distributed.is_main_process():
            print(f"run already finished: checkpoint at step {run.start} >= train.steps", flush=True)
        return last
    finally:
        run.close()


def precompute(c: ml_collections.ConfigDict) -> None:
    """Builds the data caches and the reference tables, then stops (`dpo-jax precompute`)."""
    build_run(c).close()
    print("precompute done", flush=True)
