"""`dpo-jax train`: config -> model, data, engine, reference tables -> the training loop with checkpoints.

Resume is automatic: if the run directory holds a checkpoint, training continues from it exactly (state, loader
position, partial logging window), and metrics.jsonl is cut back to that step. SIGTERM (TPU preemption) finishes the
current step, saves and exits 0. A non-finite loss or gradient stops the run naming the step and example ids;
checkpoints are only written after the metrics since the last one were checked finite, so the last one is good.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dpo_jax import distributed, reference, summaries
from dpo_jax.convert import native
from dpo_jax.convert.hf import load_hf_checkpoint, read_hf_config
from dpo_jax.data.formats import read_examples
from dpo_jax.data.loader import PreferenceLoader
from dpo_jax.data.pipeline import build_loaders, default_cache_dir, default_data_config
from dpo_jax.flops import peak_tflops, train_step_flops
from dpo_jax.metrics import MetricWriter, itstime, truncate_jsonl
from dpo_jax.models.config import FAMILY_SWITCHES, PRESETS, ModelConfig, shaped_config
from dpo_jax.models.decoder import init_params
from dpo_jax.models.generate import SamplingConfig, generate
from dpo_jax.train.checkpoint import RunCheckpoints
from dpo_jax.train.engine import Engine, build_engine, default_engine_config
from dpo_jax.distributed import default_distributed_config

MODEL_SOURCES = ("hf", "random", "checkpoint")


class RunError(RuntimeError):
    """The run stopped for a reason the user must act on (the message says which)."""


# ----- config -----------------------------------------------------------------------------------------------------

def default_model_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "hf"  # hf: a local HF checkpoint dir; checkpoint: a `dpo-jax convert` checkpoint; random: init
    c.path = ""
    c.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.param_dtype = "float32"
    c.remat_policy = "dots"  # save matmul outputs, recompute the rest: less memory than "none" and faster here
    c.scan_layers = True  # one compiled layer body: faster compiles, and faster steps on XLA:CPU (docs/PERFORMANCE.md)
    c.attention_impl = ""  # "", "xla" or "cudnn"
    # architecture, for source = random (the vocabulary comes from the tokenizer): a shape from models/config.py
    # PRESETS (`c.model.update(PRESETS[name])`), or these fields set one by one
    c.update(PRESETS["gpt2-tiny"])  # family, hidden_size, num_layers, num_heads, intermediate_size
    c.max_position_embeddings = 512
    c.seed = 0
    return c


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
    return c


# ----- model, tokenizer, reference ---------------------------------------------------------------------------------

def _model_overrides(m: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy, scan_layers=m.scan_layers,
                attention_impl=m.attention_impl or None)


def random_model_config(m: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The from-scratch model of a `model` section (source = random): its family's switches and its shape."""
    if m.family not in FAMILY_SWITCHES:
        raise ValueError(f"config.model.family = {m.family!r} for source=random; valid: {', '.join(FAMILY_SWITCHES)}")
    return shaped_config(m.family, vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
                         max_position_embeddings=m.max_position_embeddings, **_model_overrides(m))


def model_loader(m: ml_collections.ConfigDict, vocab_size: int) -> tuple[ModelConfig, Callable[[], Any]]:
    """(ModelConfig, load()) where load() returns fresh initial params (jittable for source=random)."""
    if m.source not in MODEL_SOURCES:
        raise ValueError(f"config.model.source = {m.source!r}; valid: {', '.join(MODEL_SOURCES)}")
    if m.source == "random":
        config = random_model_config(m, vocab_size)
        return config, lambda: init_params(config, jax.random.key(m.seed))
    if not m.path:
        raise ValueError(f"config.model.path is empty (needed for source={m.source!r})")
    if m.source == "hf":
        config = read_hf_config(m.path)[1].replace(**_model_overrides(m))
        return config, lambda: load_hf_checkpoint(m.path, m.param_dtype, config_overrides=_model_overrides(m))[1]
    config_path = os.path.join(m.path, native.CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"config.model.path = {m.path!r} is not a dpo_jax model checkpoint (no {native.CONFIG_FILE})")
    with open(config_path) as f:
        config = ModelConfig.from_json(f.read()).replace(**_model_overrides(m))
    return config, lambda: native.load_model(m.path)[1]


def load_tokenizer(c: ml_collections.ConfigDict):
    """data.tokenizer: a local HF tokenizer dir; `bpe:N` = a byte-level BPE of N tokens trained on the train split
    (cached); empty = the model's own directory."""
    from transformers import AutoTokenizer

    spec = c.data.tokenizer or (c.model.path if c.model.source == "hf" else "")
    if not spec:
        raise ValueError("config.data.tokenizer is empty and the model has no tokenizer directory")
    if not spec.startswith("bpe:"):
        return AutoTokenizer.from_pretrained(spec)
    from dpo_jax.data.bpe import train_bpe_tokenizer
    from dpo_jax.data.storage import files_fingerprint
    from dpo_jax.fingerprint import fingerprint

    vocab = int(spec.split(":", 1)[1])
    directory = os.path.join(c.data.cache_dir or default_cache_dir(), "tokenizers",
                             fingerprint([files_fingerprint(c.data.train_path), vocab]))
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        def texts():
            for ex in read_examples(c.data.train_path, None if c.data.format == "auto" else c.data.format):
                if hasattr(ex, "prompt"):
                    for t in (ex.prompt, ex.chosen, ex.rejected):
                        yield t if isinstance(t, str) else " ".join(m["content"] for m in t)
        train_bpe_tokenizer(texts(), vocab, directory)
    return AutoTokenizer.from_pretrained(directory)


# ----- the loop ---------------------------------------------------------------------------------------------------

class _Preemption:
    """SIGTERM: the loop finishes its step, saves and exits 0.

    One process: a SIGTERM handler sets a flag. Several processes: the save is collective, so every host must stop
    at the same step whichever of them got the signal; JAX's preemption sync manager (started by
    `jax.distributed.initialize`, which catches SIGTERM itself) agrees on that step, and orbax's
    `reached_preemption(step)` asks it. Every host calls `reached(step)` at every step."""

    def __init__(self, checkpoints: RunCheckpoints):
        self.requested = False
        self._checkpoints = checkpoints
        self._multi = jax.process_count() > 1
        self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        return self._checkpoints.reached_preemption(step) if self._multi else self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _attach_reference(local: dict, engine: Engine, tables: dict | None, split: str, ref_params: Any) -> dict:
    if not engine.config.needs_reference:
        return local
    if tables is not None:
        return {**local, **tables[split].lookup(local["example_id"])}
    sc, sr, _, _ = (np.asarray(x) for x in engine.reference_step(ref_params, engine.shard_batch(local)))
    b, p = len(local["example_id"]), jax.process_index()
    return {**local, "ref_chosen_logps": sc[p * b:(p + 1) * b], "ref_rejected_logps": sr[p * b:(p + 1) * b]}


class CompileAhead:
    """Compiles the train step for the first batch's shapes on a background thread, so that compilation overlaps
    the reference pass (on an accelerator the pass runs on the device and the compile on the host). The jit's own
    cache then serves the first step; `wait()` re-raises a compile error before training starts."""

    def __init__(self, engine: Engine, loader: PreferenceLoader, state: Any):
        first = loader.batch_at(int(loader.state.epoch), int(loader.state.step))  # pure: consumes nothing
        if engine.config.needs_reference:
            zeros = np.zeros(len(first["example_id"]), np.float32)
            first = {**first, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                (state, engine.shard_batch(first)))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._compile, args=(engine.train_step, abstract), daemon=True)
        self._thread.start()

    def _compile(self, train_step, abstract) -> None:
        try:
            train_step.lower(*abstract).compile()
        except BaseException as e:  # noqa: BLE001 — handed to the main thread by wait()
            self._error = e

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class Run:
    """Everything a command needs, built once from the config (and resumed from the run directory if possible)."""

    def __init__(self, c: ml_collections.ConfigDict, compile_train_step: bool = False):
        distributed.initialize(c.distributed)
        self.c = c
        self.main = distributed.is_main_process()
        self.run_dir = os.path.abspath(c.train.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.tokenizer = load_tokenizer(c)
        self.model, self.load_initial = model_loader(c.model, len(self.tokenizer))
        if self.model.vocab_size < len(self.tokenizer):
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is "
                             f"{self.model.vocab_size}")
        self.loaders = self._loaders(None)
        windows = [loader.score_window for loader in self.loaders.values()]
        window = max(windows) if all(windows) else 0  # one step serves every split; 0: a split has no window
        if window and self.main:
            print(f"score window: the unembedding runs on at most {window} positions per row (the data's longest "
                  "scored span)", flush=True)
        if c.model.source == "random":  # initialised inside the sharded jit: born on its devices
            self.engine = build_engine(c, self.model, self.load_initial, score_window=window)
        else:  # loaded on the host, then donated into the sharded state
            self.engine = build_engine(c, self.model, lambda p: p, self.load_initial(), score_window=window)
        self.checkpoints = RunCheckpoints(os.path.join(self.run_dir, "checkpoints"), keep=c.train.keep_checkpoints)
        self.writer = MetricWriter(self.run_dir, enabled=self.main, tensorboard=c.train.tensorboard)
        self.state, self.window, self.start = self.engine.state, None, 0
        self.initial_state = self.state
        latest = self.checkpoints.latest_step()
        if latest is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
            self.state, loader_state, self.window = self.checkpoints.restore(latest, abstract, model=self.model,
                                                                             mode=c.train.mode)
            jax.tree.map(lambda x: x.delete(), self.engine.state)
            self.engine = self.engine._replace(state=self.state)  # never hand out the deleted initial state
            self.initial_state = None
            self.loaders["train"].close()
            self.loaders["train"] = self._loaders(loader_state)["train"]
            self.start = latest
            if self.main:
                truncate_jsonl(self.writer.metrics_path, latest)
                truncate_jsonl(self.writer.samples_path, latest)
                print(f"resumed from {self.checkpoints.directory}/{latest}", flush=True)
        if self.main:  # only now: a run refused by its checkpoint must not overwrite that run's files
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                f.write(c.to_json_best_effort(indent=2, sort_keys=True))
            with open(os.path.join(self.run_dir, "model_config.json"), "w") as f:
                f.write(self.model.to_json())
        self.compile_ahead = CompileAhead(self.engine, self.loaders["train"], self.state) \
            if compile_train_step and self.start < c.train.steps else None
        self.tables, self.ref_params = _prepare_reference(c, self.engine, self.loaders, self.initial_state,
                                                          self.load_initial, self.run_dir)
        self.prompts = _sample_prompts(self.loaders.get("eval"), c.train.eval_samples, self.tokenizer) \
            if c.train.eval_samples else None

    def _loaders(self, train_state):
        c = self.c
        return build_loaders(c.data, global_batch_pairs=c.train.global_batch_pairs, seed=c.train.seed,
                             data_parallel_size=_dp(c), process_index=jax.process_index(),
                             process_count=jax.process_count(), tokenizer=self.tokenizer, train_state=train_state)

    def evaluate(self, step: int) -> None:
        _evaluate(self.c, self.engine, self.state, self.loaders["eval"], self.tables, self.ref_params, self.writer,
                  step, self.prompts, self.tokenizer)

    def close(self) -> None:
        self.checkpoints.close()
        for loader in self.loaders.values():
            loader.close()
        self.writer.close()


def train(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged train metrics."""
    run = Run(c, compile_train_step=True)
    engine, model, checkpoints, writer = run.engine, run.model, run.checkpoints, run.writer
    state, window = run.state, run.window
    if run.prompts is not None and run.start == 0:
        ref = run.ref_params if run.ref_params is not None else state.params
        writer.samples(0, "reference", _samples(ref, model, run.prompts, run.tokenizer, c))
    preemption = _Preemption(checkpoints)
    peak = c.train.peak_tflops_per_device or peak_tflops(jax.devices()[0].device_kind)
    progress = tqdm(total=c.train.steps, initial=run.start, unit="step", dynamic_ncols=True,
                    disable=not (run.main and sys.stderr.isatty()))
    last_logged: dict[str, float] = {}
    pending = []  # (step, loss Mean, grad norm, example ids) since the last check, for NaN diagnosis
    window_flops = 0.0  # model FLOPs of the steps in the logging window (each step at its own sequence length)
    deferred = None  # a log point whose metrics are read after the next step is dispatched
    t0 = time.perf_counter()
    if run.compile_ahead is not None:
        run.compile_ahead.wait()

    def write_log(point) -> None:
        """Checks a log point's steps finite, then writes its window (this waits for its last step)."""
        nonlocal last_logged, t0
        step, logged_window, logged_pending, flops = point
        _check_finite(logged_pending, checkpoints)
        values = summaries.finalize(logged_window)
        elapsed = time.perf_counter() - t0  # from the previous log point's results to this one's
        steps_in_window = float(logged_window["num_tokens"].count)
        values["tokens_per_second"] = values["num_tokens"] * steps_in_window / elapsed if elapsed else 0.0
        if peak:
            values["mfu"] = flops / elapsed / (peak * 1e12 * jax.device_count())
        writer.scalars(step, "train", values)
        last_logged, t0 = values, time.perf_counter()

    try:
        for step in range(run.start + 1, c.train.steps + 1):
            local = _attach_reference(next(run.loaders["train"]), engine, run.tables, "train", run.ref_params)
            state, metrics = engine.train_step(state, engine.shard_batch(local))
            run.state = state
            progress.update(1)
            if deferred is not None:  # the previous step's metrics, read while this step runs
                write_log(deferred)
                deferred = None
            window = metrics if window is None else summaries.merge(window, metrics)
            window_flops += train_step_flops(model, engine.config.rows(c.train.global_batch_pairs),
                                             local["input_ids"].shape[1], engine.config.score_window)
            pending.append((step, metrics["loss"], metrics["grad_norm"].total, local["example_id"]))
            final = step == c.train.steps
            stop = preemption.reached(step)  # read once: the signal may land at any moment
            log_now = itstime(step, c.train.log_every, c.train.steps)
            save_now = itstime(step, c.train.save_every, c.train.steps) or stop
            evaluate_now = "eval" in run.loaders and itstime(step, c.train.eval_every, c.train.steps)
            if log_now:
                deferred = (step, window, pending, window_flops)
                window, pending, window_flops = None, [], 0.0
                if save_now or evaluate_now:  # these need the step's results now
                    write_log(deferred)
                    deferred = None
            if save_now:
                _check_finite(pending, checkpoints)
                pending = []
                checkpoints.save(step, state, loader=run.loaders["train"].state, window=window, model=model,
                                 mode=c.train.mode)
            if evaluate_now:
                run.evaluate(step)
                t0 = time.perf_counter()
            if stop and not final:
                checkpoints.wait()
                print(f"SIGTERM: saved checkpoint at step {step} in {checkpoints.directory}; exiting", flush=True)
                break
        else:
            if run.start >= c.train.steps and run.main:
                print(f"run already finished: checkpoint at step {run.start} >= train.steps", flush=True)
    finally:
        progress.close()
        preemption.restore()
        run.close()
    return last_logged


def precompute(c: ml_collections.ConfigDict) -> None:
    """Builds the data caches and the reference tables, then stops (`dpo-jax precompute`)."""
    run = Run(c)
    run.close()
    print("precompute done", flush=True)


def evaluate(c: ml_collections.ConfigDict) -> None:
    """Evaluates the run directory's latest checkpoint (or the initial model) on the eval split (`dpo-jax eval`)."""
    run = Run(c)
    try:
        if "eval" not in run.loaders:
            raise ValueError("config.data.eval_path is empty: nothing to evaluate")
        run.evaluate(run.start)
    finally:
        run.close()


def _dp(c: ml_collections.ConfigDict) -> int:
    """The data-parallel size of the mesh the engine will build (the loaders are built first)."""
    from dpo_jax.sharding import data_parallel_size, make_mesh

    return data_parallel_size(make_mesh(c.mesh), c.mesh.rules)


def _check_finite(pending: list, checkpoints: RunCheckpoints) -> None:
    for step, loss, grad_norm, ids in pending:
        if not (np.isfinite(float(loss.total)) and np.isfinite(float(grad_norm))):
            good = checkpoints.latest_step()
            real = [int(i) for i in np.asarray(ids) if i >= 0]
            raise RunError(f"non-finite loss or gradient at step {step} (example ids {real[:16]}); stopping. "
                           f"The last good checkpoint is {'step ' + str(good) if good is not None else 'none'} "
                           f"in {checkpoints.directory}")


def _reference_model_config(c) -> ml_collections.ConfigDict:
    """The model section that loads the separate reference (config.reference.path)."""
    return ml_collections.ConfigDict({**c.model.to_dict(), "source": c.reference.source or c.model.source,
                                      "path": c.reference.path})


def source_identity(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """What identifies a model's initial weights without loading them: the seed of a random init, or the path of a
    checkpoint with every file's size and modification time (a rewritten checkpoint changes it)."""
    if m.source == "random":
        return {"source": "random", "seed": m.seed}
    path = os.path.abspath(m.path)
    files = []
    for root, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            st = os.stat(os.path.join(root, name))
            files.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return {"source": m.source, "path": path, "files": files}


def _reference_params(c, engine: Engine, initial_state, load_initial) -> tuple[Any, bool]:
    """(reference params on the engine's shardings, whether they are the policy's own initial buffers)."""
    if c.reference.path:
        _, load = model_loader(_reference_model_config(c), engine.config.model.vocab_size)
        return jax.device_put(load(), engine.param_shardings), False
    if initial_state is not None:
        return initial_state.params, True
    return jax.device_put(load_initial(), engine.param_shardings), False  # resumed: rebuild the initial policy


def _prepare_reference(c, engine: Engine, loaders, initial_state, load_initial, run_dir):
    """(tables or None, resident reference params or None). Tables: one cached pass per split."""
    if not engine.config.needs_reference:
        return None, None
    cache_dir = c.data.cache_dir or default_cache_dir()
    if c.dpo.reference == "per_batch":
        params, shared = _reference_params(c, engine, initial_state, load_initial)
        return None, jax.tree.map(jnp.copy, params) if shared else params  # the policy's buffers get donated

    settings = {"chunk": c.train.logprob_chunk_size, "model": engine.config.model.to_json(),
                "score_window": engine.config.score_window}
    ref_model = _reference_model_config(c) if c.reference.path else c.model
    identity = {"reference": source_identity(ref_model),
                "data": {split: _data_identity(loader) for split, loader in loaders.items()}, "settings": settings}
    record = os.path.join(run_dir, "reference.json")
    if os.path.isfile(record):
        with open(record) as f:
            saved = json.load(f)
        paths = saved.get("paths", {})
        changed = [k for k in identity if saved.get("identity", {}).get(k) != identity[k]]
        if not changed and set(paths) == set(loaders) and all(os.path.isfile(p) for p in paths.values()):
            return {s: reference.ReferenceTable.load(p) for s, p in paths.items()}, None
        print(f"reference tables in {record} were computed for another "
              f"{', '.join(changed) or 'set of cache files'}; recomputing", flush=True)
    params, shared = _reference_params(c, engine, initial_state, load_initial)
    weights = reference.weights_fingerprint(params)
    tables, paths = {}, {}
    for split, loader in loaders.items():
        paths[split] = reference.cache_path(cache_dir, split, weights=weights, data=identity["data"][split],
                                            settings=settings)
        tables[split], cached = reference.precompute(params, engine.reference_step, lambda lo=loader: _one_pass(lo),
                                                     engine.mesh, engine.rules, paths[split],
                                                     keys=engine.config.row_keys)
        print(f"reference log-probs for {split}: {len(tables[split])} examples "
              f"({'cache hit' if cached else 'computed'}: {paths[split]})", flush=True)
    if distributed.is_main_process():
        with open(record, "w") as f:
            json.dump({"identity": identity, "paths": paths}, f)
    if not shared:
        jax.tree.map(lambda x: x.delete(), params)  # the reference is not needed on device any more
    return tables, None


def _one_pass(loader: PreferenceLoader) -> PreferenceLoader:
    """A fresh, unshuffled single pass over a loader's split, with the same batch geometry."""
    return PreferenceLoader(loader.source, global_batch_pairs=loader.global_batch, seq_len=loader.buckets,
                            lengths=loader.lengths, shuffle=False, num_epochs=1, prefetch=2,
                            process_index=loader.process_index,
                            process_count=loader.global_batch // loader.local_batch, layout=loader.layout,
                            score_window=loader.score_window)


def _data_identity(loader: PreferenceLoader) -> str:
    """The tokenized split's TFDS identity (its config name fingerprints data, tokenizer and lengths)."""
    info = getattr(loader.source, "dataset_info", None)
    return f"{getattr(info, 'full_name', 'in-memory')}:{getattr(loader.source, 'split', '')}:{len(loader.source)}"


def _sample_prompts(eval_loader, k: int, tokenizer):
    if eval_loader is None:
        raise ValueError("config.train.eval_samples > 0 needs an eval split (config.data.eval_path)")
    rows = [eval_loader.source[i] for i in range(min(k, len(eval_loader.source)))]
    prompts = [np.asarray(r["chosen_input_ids"])[np.asarray(r["chosen_loss_mask"]) == 0] for r in rows]
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def _samples(params, model: ModelConfig, prompts, tokenizer, c) -> list[dict[str, str]]:
    ids, mask = prompts
    out = generate(params, model, ids, mask, jax.random.key(c.train.seed),
                   SamplingConfig(max_new_tokens=c.train.sample_max_new_tokens,
                                  temperature=c.train.sample_temperature, eos_id=tokenizer.eos_token_id,
                                  pad_id=tokenizer.pad_token_id or 0))
    tokens, gen_mask = np.asarray(out.tokens), np.asarray(out.mask)
    return [{"prompt": tokenizer.decode(ids[i][mask[i] == 1]),
             "completion": tokenizer.decode(tokens[i][gen_mask[i] == 1], skip_special_tokens=True)}
            for i in range(len(ids))]


def _evaluate(c, engine, state, eval_loader, tables, ref_params, writer, step, prompts, tokenizer) -> None:
    total = None
    for local in _one_pass(eval_loader):
        local = _attach_reference(local, engine, tables, "eval", ref_params)
        m = engine.eval_step(state.params, engine.shard_batch(local))
        total = m if total is None else summaries.merge(total, m)
    writer.scalars(step, "eval", summaries.finalize(total))
    if prompts is not None:
        writer.samples(step, "policy", _samples(state.params, engine.config.model, prompts, tokenizer, c))


def default_config() -> ml_collections.ConfigDict:
    return default_run_config()


def _command(fn: Callable, name: str) -> Callable[[ml_collections.ConfigDict], None]:
    def run(c: ml_collections.ConfigDict) -> None:
        try:
            fn(c)
        except RunError as e:
            print(f"dpo-jax {name}: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
    return run


main = _command(train, "train")
precompute_main = _command(precompute, "precompute")
eval_main = _command(evaluate, "eval")
