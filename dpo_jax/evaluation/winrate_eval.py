"""The sampling evaluation of `dpo-jax eval` (commands/eval.py; the `winrate` config section): a run's policy — and
other runs side by side — sampled on the eval split's prompts at every temperature of a sweep, each completion judged
against the split's preferred response or another run's completion at the same temperature; win rates with 95 %
intervals in winrate.csv / winrate.md / winrate.png and every judged completion in completions.jsonl.

    dpo-jax eval --config configs/tiny.py --config.winrate.judge.kind=endpoint \\
        --config.winrate.judge.endpoint.base_url=http://127.0.0.1:8000/v1 --config.winrate.judge.endpoint.model=NAME

The sampling evaluation runs when a judge is chosen (`winrate.judge.kind`); without one `dpo-jax eval` reports
the eval split's loss metrics only.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax.evaluation import winrate
from dpo_jax.evaluation.endpoint import EndpointConfig, EndpointJudge
from dpo_jax.evaluation.judges import Judge, function_judge, reward_model_judge
from dpo_jax.evaluation.sampling import check_temperatures, decode_completions, sample_sweep, token_lengths, win_rates
from dpo_jax.models.generate import SamplingConfig
from dpo_jax.models.placement import place_on_mesh
from dpo_jax.train.checkpoint import RunCheckpoints
from dpo_jax.train.evaluation import sample_prompts, seeded_sample
from dpo_jax.train.export import restore_params
from dpo_jax.train.model_source import default_model_config
from dpo_jax.train.modes import get_mode

JUDGES = ("function", "reward_model", "endpoint")


def default_winrate_config() -> ml_collections.ConfigDict:
    j = ml_collections.ConfigDict()
    j.kind = ""  # empty: no sampling evaluation | function (ground truth) | reward_model | endpoint (an LLM judge)
    j.function = ""  # kind = function: "module:name" or "file.py:name", whole texts -> floats
    j.model = default_model_config()  # kind = reward_model: an HF *ForSequenceClassification dir or ours
    j.max_length = 1024  # kind = reward_model: the last tokens of prompt + response it scores
    j.endpoint = ml_collections.ConfigDict(dict(
        base_url="",  # an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM)
        model="",  # the served model's name
        api_key_env="OPENAI_API_KEY",  # environment variable holding the key (unset: no Authorization header)
        template="summarization",  # summarization (= _concise) | summarization_simple | dialogue (the paper's
        #   App. C.2 prompts) | a template file
        temperature=0.0,  # the judge's sampling temperature
        both_orders=0.25,  # share of comparisons (seeded) also asked in the other order: position bias
        max_concurrency=8, max_retries=5, backoff_s=1.0, max_wait_s=60.0, timeout_s=120.0, max_tokens=256,
        cache="",  # verdict cache (JSONL); empty: OUT_DIR/verdicts.jsonl
    ))
    c = ml_collections.ConfigDict()
    c.temperatures = (0.0, 0.25, 0.5, 0.75, 1.0)  # the paper's sweep (0 = greedy)
    c.prompts = 256  # N examples of the eval split, drawn with `seed` (all of them if it has fewer)
    c.max_new_tokens = 128
    c.baseline = "chosen"  # the eval split's preferred response, or the name of one of `runs`
    c.name = "policy"  # this run's line in the tables
    c.runs = ""  # more policies side by side: "name=RUN_DIR,name=RUN_DIR" (runs of `dpo-jax train`, same shape)
    c.batch_rows = 64  # sampling chunk (rows per generate call); must divide over the mesh's batch axes
    c.seed = 0  # the prompt sample, sampling keys and the judge's A/B order
    c.out_dir = ""  # empty: RUN_DIR/winrate
    c.judge = j
    return c


def parse_runs(spec: str) -> dict[str, str]:
    runs = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"config.winrate.runs: {item!r} is not NAME=RUN_DIR")
        runs[name] = path
    return runs


def check(c: ml_collections.ConfigDict, run_dir: str) -> dict[str, str]:
    """Everything that can be wrong before a model is loaded or a token sampled; returns the other runs."""
    w = c.winrate
    check_temperatures(w.temperatures, "winrate.temperatures")
    check_judge(w.judge)
    if w.judge.kind == "endpoint" and jax.process_count() > 1:
        raise ValueError("the endpoint judge runs on one process; run the sampling evaluation single-host")
    runs = parse_runs(w.runs)
    if w.name in runs:
        raise ValueError(f"config.winrate.runs: {w.name!r} is this run's name (config.winrate.name)")
    if w.baseline != "chosen" and w.baseline not in runs:
        raise ValueError(f"config.winrate.baseline = {w.baseline!r}: 'chosen' or one of config.winrate.runs "
                         f"({', '.join(runs) or 'none given'})")
    if w.prompts < 1 or w.max_new_tokens < 1:
        raise ValueError("config.winrate.prompts and config.winrate.max_new_tokens must be >= 1")
    for name, path in {w.name: run_dir, **runs}.items():
        directory = os.path.join(os.path.abspath(path), "checkpoints")
        checkpoints = RunCheckpoints(directory, keep=1000) if os.path.isdir(directory) else None
        try:
            if checkpoints is None or checkpoints.latest_step() is None:
                raise ValueError(f"config.winrate: run {name!r} ({path}) has no policy checkpoint to evaluate")
        finally:
            if checkpoints is not None:
                checkpoints.close()
    if get_mode(c.train.mode).head != "lm":
        raise ValueError("config.winrate: a reward-model run cannot sample; evaluate a policy run")
    return runs


def check_judge(j: ml_collections.ConfigDict, key: str = "config.winrate.judge") -> None:
    """A judge section's settings, before anything is loaded or sampled; errors name `key`."""
    if j.kind not in JUDGES:
        raise ValueError(f"{key}.kind = {j.kind!r}: choose one of {', '.join(JUDGES)}")
    if j.kind == "function" and not j.function:
        raise ValueError(f"{key}.function is empty ('module:name' or 'file.py:name')")
    if j.kind == "endpoint" and not (j.endpoint.base_url and j.endpoint.model):
        raise ValueError(f"{key}.endpoint.base_url and .model must be set for the endpoint judge")
    if j.kind == "endpoint" and not 0 <= j.endpoint.both_orders <= 1:
        raise ValueError(f"{key}.endpoint.both_orders = {j.endpoint.both_orders}: a share of the comparisons, "
                         "in [0, 1]")


def build_judge(c: ml_collections.ConfigDict, tokenizer: Any, mesh: Any, out_dir: str) -> Judge:
    return judge_for(c.winrate.judge, c.winrate.seed, out_dir, tokenizer, mesh, c.mesh.rules, c.winrate.batch_rows)


def judge_for(j: ml_collections.ConfigDict, seed: int, out_dir: str, tokenizer: Any = None, mesh: Any = None,
              rules: Any = None, batch_rows: int = 64, key: str = "config.winrate.judge") -> Judge:
    """The judge a `winrate.judge`-shaped section names (`key` in errors); tokenizer and mesh: a reward model's."""
    check_judge(j, key)
    if j.kind == "function":
        return function_judge(j.function, key=f"{key}.function")
    if j.kind == "reward_model":
        return reward_model_judge(j.model, tokenizer, mesh, rules, j.max_length, batch_rows,
                                  name=f"reward model {j.model.path}")
    e = j.endpoint
    return EndpointJudge(EndpointConfig(
        base_url=e.base_url, model=e.model, cache_path=e.cache or os.path.join(out_dir, "verdicts.jsonl"),
        template=e.template, api_key_env=e.api_key_env, max_concurrency=e.max_concurrency,
        max_retries=e.max_retries, backoff_s=e.backoff_s, max_wait_s=e.max_wait_s, timeout_s=e.timeout_s,
        temperature=e.temperature, max_tokens=e.max_tokens, seed=seed, both_orders=e.both_orders))


def evaluate_winrate(run: Any, runs: dict[str, str]) -> list[dict[str, Any]]:
    """The sweep for `run` (a train/run.py Run at its restored checkpoint) and `runs`; writes the outputs."""
    c, w = run.config, run.config.winrate
    out_dir = w.out_dir or os.path.join(os.path.abspath(c.train.run_dir), "winrate")
    os.makedirs(out_dir, exist_ok=True)
    if "eval" not in run.loaders:
        raise ValueError("config.winrate needs an eval split (config.data.eval_path): its prompts and preferred "
                         "responses")
    tok, pad = run.tokenizer, run.tokenizer.pad_token_id or 0
    split = run.loaders["eval"].source
    picked = seeded_sample(len(split), w.prompts, w.seed)
    ids, mask = sample_prompts(run.loaders["eval"], w.prompts, pad, picked)
    prompts = tok.batch_decode([r[m == 1] for r, m in zip(ids, mask)], skip_special_tokens=True)
    # like terms: the preferred response cut to the policy's budget (the same prompt text goes to the judge for both)
    responses = [np.asarray(s["chosen_input_ids"])[np.asarray(s["chosen_loss_mask"]) == 1][:w.max_new_tokens]
                 for s in (split[int(i)] for i in picked)]
    chosen = tok.batch_decode(responses, skip_special_tokens=True)
    temps = check_temperatures(w.temperatures, "winrate.temperatures")
    sampling = SamplingConfig(max_new_tokens=w.max_new_tokens, eos_id=tok.eos_token_id, pad_id=pad)
    decode = decode_completions(tok)
    mesh = run.engine.mesh

    def completions(params, model):
        sweep = sample_sweep(params, model, ids, mask, temps, sampling, jax.random.key(w.seed), w.batch_rows)
        return [decode(t, m) for t, m in sweep], [token_lengths(t, m, tok.eos_token_id) for t, m in sweep]

    texts, lengths = {}, {}
    texts[w.name], lengths[w.name] = completions(run.state.params, run.model)
    for name, path in runs.items():
        _, model, params, step = restore_params(path)
        texts[name], lengths[name] = completions(place_on_mesh(model, params, mesh, c.mesh.rules)[0], model)
        print(f"[winrate] {name}: sampled step {step} of {path}", flush=True)
    judge = build_judge(c, tok, mesh, out_dir)
    baseline = chosen if w.baseline == "chosen" else texts[w.baseline]
    rows, records = [], []
    for name, sweep in texts.items():
        if name == w.baseline:
            continue
        base_lengths = [np.asarray([len(r) for r in responses]) if w.baseline == "chosen" else
                        lengths[w.baseline][i][0] for i in range(len(temps))]
        mine, judged = win_rates(judge, name, temps, prompts, sweep, baseline,
                                 [(*lengths[name][i], base_lengths[i]) for i in range(len(temps))])
        rows += mine
        records += judged
    label = "the eval split's preferred responses" if w.baseline == "chosen" else f"{w.baseline} at each temperature"
    differences = winrate.paired_differences(records, w.name)
    winrate.write_tables(rows, out_dir, baseline=label, judge=judge.name, differences=differences)
    winrate.plot(rows, os.path.join(out_dir, "winrate.png"), title=f"win rate vs {label} ({judge.name})")
    with open(os.path.join(out_dir, "completions.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(winrate.markdown_table(rows, baseline=label, judge=judge.name), flush=True)
    if hasattr(judge, "stats"):
        print(f"[winrate] judge: {judge.stats}", flush=True)
    print(f"[winrate] written to {out_dir}/winrate.md, winrate.csv, winrate.png, completions.jsonl", flush=True)
    return rows
