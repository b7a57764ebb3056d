"""`dpo-jax judge-agreement --config.data_path=PAIRS.jsonl --config.judge.kind=KIND ...`: before trusting a judge's
win rates, how often it agrees with people — and people with each other — on human-labelled pairs, and (an LLM
judge) its position bias. The DPO paper's §6.4 / Table 2 for any judge (evaluation/agreement.py):

    dpo-jax judge-agreement --config.data_path=labels.jsonl --config.judge.kind=endpoint \\
        --config.judge.endpoint.base_url=http://127.0.0.1:8000/v1 --config.judge.endpoint.model=NAME \\
        --config.templates=summarization_simple,summarization_concise

Each labelled pair is judged as candidate = `chosen` against baseline = `rejected` (the shown order drawn per pair,
half each way). Writes agreement.md / agreement.csv (one row per judge: agreement with the human majority and with
one annotator, the human–human ceiling, each with a 95 % interval; invalid and failed verdicts; for an LLM judge the
share of "A" answers and how often the winner flipped with the order) and judgments.jsonl (every pair, what the
judge was shown and said) to `out_dir`.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import ml_collections

from dpo_jax import sharding
from dpo_jax.evaluation import agreement as agree
from dpo_jax.evaluation.winrate_eval import check_judge, default_winrate_config, judge_for


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_path = ""  # human-labelled pairs: JSONL/parquet with prompt, chosen, rejected[, annotations]
    c.limit = 0  # the first N pairs (0: all)
    c.judge = default_winrate_config().judge  # kind: function | reward_model | endpoint, as in `dpo-jax eval`
    c.judge.endpoint.both_orders = 1.0  # every pair asked both ways: the position bias on all of them
    c.templates = ""  # endpoint: several templates side by side ("summarization_simple,summarization_concise");
    #   empty: judge.endpoint.template
    c.tokenizer = ""  # reward_model: a local HF tokenizer dir; empty: the reward model's directory
    c.batch_rows = 64  # reward_model: rows per scoring call
    c.seed = 0  # the shown order
    c.out_dir = "runs/judge_agreement"
    c.mesh = sharding.default_mesh_config()
    return c


FIELDS = ("judge", "pairs", "judged", "majority", "majority_low", "majority_high", "annotator", "annotator_low",
          "annotator_high", "human_human", "human_human_low", "human_human_high", "invalid", "failed", "a_rate",
          "order_flips")


def main(c: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    if not c.data_path:
        raise ValueError("config.data_path is empty: point it at a file of human-labelled pairs")
    check_judge(c.judge, "config.judge")
    templates = [t.strip() for t in c.templates.split(",") if t.strip()]
    if templates and c.judge.kind != "endpoint":
        raise ValueError(f"config.templates = {c.templates!r} is for the endpoint judge (config.judge.kind = "
                         f"{c.judge.kind!r})")
    pairs = agree.read_labelled_pairs(c.data_path, c.limit)
    os.makedirs(c.out_dir, exist_ok=True)
    tokenizer = mesh = None
    if c.judge.kind == "reward_model":
        from dpo_jax.data.tokenizers import load_tokenizer
        from dpo_jax.train.model_source import tokenizer_dir

        tokenizer = load_tokenizer({"tokenizer": c.tokenizer}, tokenizer_dir(c.judge.model))
        mesh = sharding.make_mesh(c.mesh)
    rows, records = [], []
    for template in templates or [None]:
        section = c.judge.copy_and_resolve_references()
        if template:
            section.endpoint.template = template
        judge = judge_for(section, c.seed, c.out_dir, tokenizer, mesh, c.mesh.rules, c.batch_rows, "config.judge")
        name = judge.name + (f" ({template})" if template else "")
        judged = judge.judge(pairs.prompts, pairs.chosen, pairs.rejected)
        figures = agree.agreement(judged.outcomes, pairs.votes)
        rows.append(_row(name, figures, judged.summary))
        records += [{"judge": name, "source": s, "human_majority": m, "outcome": None if o != o else float(o), **r}
                    for s, m, o, r in zip(pairs.sources, agree.majority(pairs.votes).tolist(), judged.outcomes,
                                          judged.records)]
    _write(c.out_dir, rows, records, c.data_path, len(pairs.prompts))
    return rows


def _row(name: str, figures: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    row = {"judge": name, "pairs": figures["pairs"], "judged": figures["judged"],
           "invalid": summary.get("invalid", 0), "failed": summary.get("failed", 0),
           "a_rate": summary.get("a_rate", float("nan")), "order_flips": summary.get("order_flips", float("nan"))}
    for key in ("majority", "annotator", "human_human"):
        interval = figures[key]
        row[key], row[f"{key}_low"], row[f"{key}_high"] = (interval.estimate, interval.low, interval.high) \
            if interval else (float("nan"),) * 3
        row[f"{key}_text"] = agree.interval_text(interval, figures[f"{key}_pairs"])
    return row


def _write(out_dir: str, rows: list[dict[str, Any]], records: list[dict[str, Any]], path: str, n: int) -> None:
    with open(os.path.join(out_dir, "agreement.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "judgments.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    percent = lambda x: "—" if x != x else f"{100 * x:.1f} %"  # noqa: E731
    lines = [f"Judge agreement on {n} human-labelled pairs ({path}); 95 % bootstrap intervals over pairs. Majority: "
             "with the human majority (even splits left out); annotator: with one annotator, comparable to the "
             "human–human agreement (the ceiling); judge ties count half; invalid and failed verdicts left out.", "",
             "| judge | with the majority | with an annotator | human–human | invalid | failed | A answers | winner "
             "flipped with the order |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['judge']} | {r['majority_text']} | {r['annotator_text']} | {r['human_human_text']} | "
              f"{r['invalid']} | {r['failed']} | {percent(r['a_rate'])} | {percent(r['order_flips'])} |" for r in rows]
    with open(os.path.join(out_dir, "agreement.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"judge-agreement: wrote {out_dir}/agreement.md, agreement.csv, judgments.jsonl", flush=True)
