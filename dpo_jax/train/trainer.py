"""The one training loop: `Trainer.fit` steps the optimizer for every mode (DPO and relatives, SFT, unlikelihood,
reward models, PPO iterations, and the experiments' runs). Periodic actions go through `itstime(step, every, total)`.

Per step: next host batch -> reference log-probs attached -> `engine.train_step`. Metrics are summed over a
logging window and read one step late (the next step is already dispatched, so the host never stalls the device).
A non-finite loss or gradient stops the run naming the step and example ids; a checkpoint is written only after
the steps since the previous one were checked finite, so the last checkpoint is always good. SIGTERM (TPU
preemption) finishes the step, saves and stops; with several processes JAX's preemption sync point, asked through
orbax, makes every host stop at the same step.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from dpo_jax import distributed, summaries
from dpo_jax.metrics import MetricWriter, itstime
from dpo_jax.models.config import ModelConfig
from dpo_jax.train.checkpoint import RunCheckpoints
from dpo_jax.train.reference_source import NO_REFERENCE


class TrainEngine(Protocol):
    """What `Trainer.fit` needs of an engine: train/engine.py's Engine (every registered mode) and rlhf/ppo.py's
    PPOEngine implement it; a new algorithm's engine does too."""

    state: Any
    train_step: Callable  # jitted (state, batch) -> (state, metrics: Means incl. loss, grad_norm, num_tokens)

    @property
    def model(self) -> ModelConfig:
        """The trained model (the policy), recorded with each checkpoint."""

    @property
    def kind(self) -> str:
        """The kind of run (a train mode, or "ppo"), recorded with each checkpoint: resuming as another is refused."""

    def shard_batch(self, local: dict) -> dict:
        """A host batch -> the step's global, sharded batch."""

    def step_flops(self, local: dict) -> float:
        """Model FLOPs of one step on this host batch (for MFU)."""


class RunError(RuntimeError):
    """The run stopped for a reason the user must act on (the message says which)."""


class Preemption:
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


def check_finite(pending: list, checkpoints: RunCheckpoints | None) -> None:
    """pending: (step, loss Mean, grad norm, example ids) of the steps since the last check."""
    for step, loss, grad_norm, ids in pending:
        if not (np.isfinite(float(loss.total)) and np.isfinite(float(grad_norm))):
            good = checkpoints.latest_step() if checkpoints is not None else None
            where = f" in {checkpoints.directory}" if checkpoints is not None else ""
            real = [int(i) for i in np.asarray(ids) if i >= 0]
            raise RunError(f"non-finite loss or gradient at step {step} (example ids {real[:16]}); stopping. "
                           f"The last good checkpoint is {'step ' + str(good) if good is not None else 'none'}"
                           f"{where}")


class Trainer:
    """Steps `engine.train_step` over host batches; logs, checkpoints, evaluates and stops on SIGTERM.

    reference: attaches reference log-probs to each host batch (train/reference_source.py).
    writer: where log points go (None: nowhere; `history` keeps them either way). name: the split of those lines.
    checkpoints: None for runs that are not resumable (the experiments' inner runs; no SIGTERM handling then).
    evaluate(step, state): called every `eval_every` steps and after the last one; its time is not in tokens/s.
    peak_tflops: per device, for MFU (0: not reported).
    rollout(batch, state): turns each host batch into the step's batch with the current state (PPO: prompts ->
    sampled responses, log-probs, values and scores; rlhf/ppo.py `Rollouts`).
    moving_reference(): a reference that moves during training (TR-DPO), saved with each checkpoint."""

    def __init__(self, engine: TrainEngine, *, steps: int, reference=NO_REFERENCE, writer: MetricWriter | None = None,
                 name: str = "train", log_every: int = 0, checkpoints: RunCheckpoints | None = None,
                 save_every: int = 0, eval_every: int = 0,
                 evaluate: Callable[[int, Any], None] | None = None, peak_tflops: float = 0.0,
                 rollout: Callable[[dict, Any], dict] | None = None,
                 moving_reference: Callable[[], Any] | None = None):
        self.engine, self.steps, self.reference, self.writer, self.name = engine, steps, reference, writer, name
        self.log_every, self.checkpoints, self.save_every = log_every, checkpoints, save_every
        self.eval_every, self.evaluate, self.peak_tflops = eval_every, evaluate, peak_tflops
        self.rollout, self.moving_reference = rollout, moving_reference
        self.history: list[dict[str, float]] = []  # every log point: {"step", metric: value}

    def fit(self, state: Any, batches: Iterator[dict], *, start: int = 0,
            window: dict | None = None) -> tuple[Any, dict[str, float]]:
        """Steps start + 1 .. steps; returns (final state, last logged metrics). window: a restored partial
        logging window. `batches.state` (the loader position) is saved with each checkpoint."""
        engine, checkpoints = self.engine, self.checkpoints
        preemption = Preemption(checkpoints) if checkpoints is not None else None
        progress = tqdm(total=self.steps, initial=start, unit="step", desc=self.name, dynamic_ncols=True,
                        leave=False, disable=not (distributed.is_main_process() and sys.stderr.isatty()))
        last: dict[str, float] = {}
        pending = []  # (step, loss Mean, grad norm, example ids) since the last finiteness check
        flops = 0.0  # model FLOPs of the logging window's steps (each at its own sequence length)
        deferred = None  # a log point whose metrics are read after the next step is dispatched
        t0, paused = time.perf_counter(), 0.0  # paused: evaluation time since t0, not counted in tokens/s

        def write_log(point) -> None:
            """Checks a log point's steps finite, then logs its window (this waits for its last step)."""
            nonlocal last, t0, paused
            step, logged_window, logged_pending, logged_flops = point
            check_finite(logged_pending, checkpoints)
            values = summaries.finalize(logged_window)
            # a host float: a jax op on the count would queue behind the step in flight, and writing this log
            # point would then wait for that step (its time lost from every tokens/s)
            window_steps = float(logged_window["num_tokens"].count)
            elapsed = time.perf_counter() - t0 - paused  # from the previous log point's results to this one's
            values["tokens_per_second"] = values["num_tokens"] * window_steps / elapsed if elapsed else 0.0
            if self.peak_tflops:
                values["mfu"] = logged_flops / elapsed / (self.peak_tflops * 1e12 * jax.device_count())
            if self.writer is not None:
                self.writer.scalars(step, self.name, values)
            self.history.append({"step": step, **values})
            last, t0, paused = values, time.perf_counter(), 0.0

        try:
            for step in range(start + 1, self.steps + 1):
                local = self.reference.attach(next(batches), "train")
                if self.rollout is not None:
                    local = self.rollout(local, state)
                state, metrics = engine.train_step(state, engine.shard_batch(local))
                progress.update(1)
                if deferred is not None:  # the previous log point's metrics, read while this step runs
                    write_log(deferred)
                    deferred = None
                window = metrics if window is None else summaries.merge(window, metrics)
                flops += engine.step_flops(local)
                pending.append((step, metrics["loss"], metrics["grad_norm"].total, local["example_id"]))
                stop = preemption is not None and preemption.reached(step)  # read once: it may land any time
                save_now = checkpoints is not None and (itstime(step, self.save_every, self.steps) or stop)
                evaluate_now = self.evaluate is not None and itstime(step, self.eval_every, self.steps)
                if itstime(step, self.log_every, self.steps):
                    deferred = (step, window, pending, flops)
                    window, pending, flops = None, [], 0.0
                    if save_now or evaluate_now or step == self.steps:  # these need the step's results now
                        write_log(deferred)
                        deferred = None
                if save_now:
                    check_finite(pending, checkpoints)
                    pending = []
                    checkpoints.save(step, state, loader=batches.state, window=window, model=engine.model,
                                     mode=engine.kind,
                                     reference=None if self.moving_reference is None else self.moving_reference())
                if evaluate_now:
                    t_eval = time.perf_counter()
                    self.evaluate(step, state)
                    paused += time.perf_counter() - t_eval
                if stop and step < self.steps:
                    checkpoints.wait()
                    print(f"SIGTERM: saved checkpoint at step {step} in {checkpoints.directory}; exiting", flush=True)
                    break
        finally:
            progress.close()
            if preemption is not None:
                preemption.restore()
        return state, last
