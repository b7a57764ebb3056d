"""Metric writers: a one-line stdout summary, JSONL, and TensorBoard (tensorboardX, no TensorFlow needed).

Only process 0 writes. On resume, `truncate_jsonl` drops lines past the restored step, so the files read as if
the run had never been interrupted.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "accuracy", "margin", "grad_norm", "learning_rate")


def itstime(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (log, save, eval) runs after `step` (1-based): every `every` steps and after the
    last one; `every` = 0 means after the last step only."""
    return step == total or (every > 0 and step % every == 0)


def truncate_jsonl(path: str, max_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= max_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"


class MetricWriter:
    """run_dir None: the stdout line only (the experiments' inner runs)."""

    def __init__(self, run_dir: str | None, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
        self.samples_path = os.path.join(run_dir, "samples.jsonl") if run_dir else None
        self._tb = None
        if enabled and tensorboard and run_dir:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, step: int, split: str, values: dict[str, float], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), step)
            self._tb.flush()
        if echo:
            shown = [f"{k} {_fmt(values[k])}" for k in SUMMARY_KEYS if k in values]
            extra = []
            if "tokens_per_second" in values:
                extra.append(f"{values['tokens_per_second']:,.0f} tok/s")
            if "mfu" in values:
                extra.append(f"MFU {100 * values['mfu']:.1f}%")
            print(f"[{split}] step {step} | " + " | ".join(shown + extra), flush=True)

    def samples(self, step: int, source: str, rows: list[dict[str, Any]]) -> None:
        if not self.enabled or not self.samples_path:
            return
        with open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, "model": source, **row}, ensure_ascii=False) + "\n")
        if self._tb is not None:
            text = "\n\n".join(f"**{r['prompt']!r}** → {r['completion']!r}" for r in rows)
            self._tb.add_text(f"samples/{source}", text, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
