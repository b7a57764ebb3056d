"""DPO (or reward-model) throughput, dpo_jax vs TRL's DPOTrainer (RewardTrainer), in one invocation on one machine.

    python bench/dpo_vs_trl.py [--mode dpo|reward] [--lengths fixed|ragged] [--layout packed|shared_prompt|pairs]
        [--systems ours,trl_default,trl_precompute] [--steps 32] [--repeats 3] [--work-dir DIR] [--out FILE.json]

--mode reward trains a Bradley-Terry reward model (a score head on the same model, TRL's
AutoModelForSequenceClassification) on the same pairs instead; there is no reference pass, so TRL runs once per
repeat (no "precompute" variant).

Both systems train the same GPT-2-shaped model (6 layers, width 512, 8 heads, vocab 8192, random init) with the
sigmoid DPO loss on the same synthetic pairs (48 prompt + 80 response tokens, 8 pairs a step, one epoch), in
float32 on the CPU, from the same word-level tokenizer and JSONL file, with the same optimizer (AdamW, lr 1e-6
linear decay, clip 1.0), logging every step and saving a resumable checkpoint at the end. Each run is a fresh
process (timed from after the imports), and the systems are interleaved — ours, TRL default, TRL precompute,
ours, ... — so drift in the machine hits all of them; ratios are reported per repeat.

--lengths ragged draws HH-shaped lengths instead of the fixed 48 + 80: prompt and response word counts log-normal,
prompt median 90 words (σ = 0.9 in log space), responses median 60 (σ = 0.8), each clipped to [4, 256], max_length
512 and max_prompt_length 256 (the paper's HH settings). These parameters are chosen to match HH's published shape
— multi-turn prompts with a long tail to the 256 cap, responses mostly under 100 tokens — not fitted to an HH
tokenization here (no HH data is available offline); mean packed pair ≈ 290 tokens, longest ≈ 640. --lengths
ragged_long: the same medians with a longer tail (σ 1.2 and 1.1, clipped to [4, 512]; max_length 1024,
max_prompt_length 512).

Ours runs with the library's defaults unless a flag says otherwise (--layout, --batch-tokens, --ours-model,
--ours-data, --ours-train); the first run prints every config key that differs from the defaults, and the JSON keeps
them per run. With the packed default and no --batch-tokens, the batch is the token budget derived for --pairs
(config.train.global_batch_pairs), so ours runs one epoch of the pairs in however many steps that takes and steady
steps are compared per pair. Every run starts with an empty compile cache unless --compile-cache shares one.

Measured per run: end-to-end time (data preparation, model init, the reference pass, compilation, every step, the
final checkpoint), the reference pass, steady-state step time (median over steps after the first two), peak RSS.

TRL runs in its own virtualenv under the work directory (created on first use: torch==2.13.0, trl, and this
environment's transformers version); it is never a dependency of dpo_jax. Everything written goes under the work
directory (default: $DPO_JAX_CACHE/bench/dpo_vs_trl, else ~/.cache/dpo_jax/bench/dpo_vs_trl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"
MODEL = dict(vocab_size=8192, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048,
             max_positions=1024)  # = models/config.py PRESETS["gpt2-bench"] (this file also runs in TRL's venv)
PROMPT_TOKENS, RESPONSE_TOKENS = 48, 80  # the response count includes its EOS
SYSTEMS = ("ours", "trl_default", "trl_precompute")


def default_work_dir() -> str:
    base = os.environ.get("DPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpo_jax")
    return os.path.join(base, "bench", "dpo_vs_trl")


# ----- inputs shared by both systems --------------------------------------------------------------------------------

def write_tokenizer(directory: str, vocab_size: int) -> None:
    """A word-level tokenizer: token `w{i}` <-> id i, so synthetic token ids round-trip through text exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(directory)


RAGGED = dict(prompt_median=90, prompt_sigma=0.9, response_median=60, response_sigma=0.8, low=4, high=256)
# --lengths ragged_long: the same medians with a longer tail (σ 1.2 / 1.1, clipped at 512 words; max_length 1024)
RAGGED_LONG = dict(prompt_median=90, prompt_sigma=1.2, response_median=60, response_sigma=1.1, low=4, high=512)
LENGTH_LIMITS = {"fixed": (PROMPT_TOKENS + RESPONSE_TOKENS, PROMPT_TOKENS), "ragged": (512, 256),
                 "ragged_long": (1024, 512)}  # (max_length, max_prompt_length)


def pair_lengths(rng, lengths: str) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) word counts; responses exclude the EOS each system adds."""
    if lengths == "fixed":
        return PROMPT_TOKENS, RESPONSE_TOKENS - 1, RESPONSE_TOKENS - 1
    r = RAGGED if lengths == "ragged" else RAGGED_LONG
    draw = lambda median, sigma: int(min(max(rng.lognormal(math.log(median), sigma), r["low"]), r["high"]))  # noqa
    return (draw(r["prompt_median"], r["prompt_sigma"]), draw(r["response_median"], r["response_sigma"]) - 1,
            draw(r["response_median"], r["response_sigma"]) - 1)


def write_pairs(path: str, num_pairs: int, vocab_size: int, seed: int, lengths: str = "fixed") -> None:
    """Random words: prompts and responses of `pair_lengths` words (+ EOS, added by each system)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(2, vocab_size, n))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(num_pairs):
            p, c, r = pair_lengths(rng, lengths)
            f.write(json.dumps({"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}) + "\n")


def write_checkpoint(directory: str, seed: int, tokenizer_dir: str, family: str = "gpt2") -> None:
    """The shared initial policy (and reference): a random-init model of the bench's shape (GPT-2, or Llama for
    the Tunix bench) written as an HF checkpoint by our exporter, with the tokenizer beside it — what both systems
    load, as a user's run starts from an HF checkpoint."""
    import jax
    from transformers import AutoTokenizer

    from dpo_jax.convert.hf import save_hf_checkpoint
    from dpo_jax.models.decoder import init_params
    from dpo_jax.train.model_source import default_model_config, random_model_config

    m = default_model_config()
    m.family, m.max_position_embeddings = family, MODEL["max_positions"]
    m.hidden_size, m.num_layers = MODEL["hidden_size"], MODEL["num_layers"]
    m.num_heads, m.intermediate_size = MODEL["num_heads"], MODEL["intermediate_size"]
    config = random_model_config(m, MODEL["vocab_size"])
    save_hf_checkpoint(config, init_params(config, jax.random.key(seed)), directory,
                       extra_config={"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0})
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)


def settings(args, work_dir: str, precompute: bool = False) -> dict:
    return dict(work_dir=work_dir, tokenizer_dir=os.path.join(work_dir, "tokenizer"),
                model_dir=os.path.join(work_dir, "model"),
                data_path=os.path.join(work_dir, "pairs.jsonl"), model=MODEL, pairs=args.pairs, steps=args.steps,
                seed=args.seed, learning_rate=1e-6, clip_grad_norm=1.0, beta=0.1,
                max_length=LENGTH_LIMITS[args.lengths][0], max_prompt_length=LENGTH_LIMITS[args.lengths][1],
                lengths=args.lengths,
                precompute=precompute, scan_layers=args.scan_layers, layout=args.layout, mode=args.mode,
                seq_len=args.seq_len, batch_tokens=args.batch_tokens, ours_model=ours_model(args),
                ours_data=ours_data(args), ours_train=ours_train(args))


def ours_model(args) -> dict:
    """--ours-model KEY=VALUE,...: our run's config.model fields (e.g. attention_query_block=0), typed as the
    defaults; an A/B of one of our settings against the same TRL."""
    from dpo_jax.train.model_source import default_model_config

    return _fields("--ours-model", getattr(args, "ours_model", ""), default_model_config(), "config.model")


def ours_data(args) -> dict:
    """--ours-data KEY=VALUE,...: our run's config.data fields (e.g. pack_lookahead=1), as --ours-model."""
    from dpo_jax.data.pipeline import default_data_config

    return _fields("--ours-data", getattr(args, "ours_data", ""), default_data_config(), "config.data")


def ours_train(args) -> dict:
    """--ours-train KEY=VALUE,...: our config.train fields (e.g. exact_pairs=true), as --ours-model."""
    from dpo_jax.train.engine import default_train_config

    return _fields("--ours-train", getattr(args, "ours_train", ""), default_train_config(), "config.train")


def _fields(flag: str, spec: str, defaults, section: str) -> dict:
    out = {}
    for item in filter(None, (spec or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults or hasattr(defaults[key], "keys"):
            raise SystemExit(f"{flag} {item!r}: {key!r} is not a {section} field")
        if isinstance(defaults[key], bool):  # bool("False") is True
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"{flag} {item!r}: {key!r} takes true or false")
            out[key] = value.lower() == "true"
        else:
            out[key] = type(defaults[key])(value)
    return out


# ----- the TRL virtualenv -------------------------------------------------------------------------------------------

def trl_python(work_dir: str, trl_version: str = TRL_VERSION, name: str = "trl-venv") -> str:
    """The TRL virtualenv's interpreter, creating the environment on first use."""
    import transformers

    return venv_python(os.path.join(work_dir, name), [f"torch=={TORCH_VERSION}", f"trl=={trl_version}",
                                                      f"transformers=={transformers.__version__}"])


def venv_python(venv: str, pins: list[str]) -> str:
    """The interpreter of a peer's virtualenv with exactly these pins, (re)created when they changed."""
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, "dpo_jax_bench_pins.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == pins:
                return python
    print(f"creating a virtualenv in {venv}: {' '.join(pins)}", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
    with open(marker, "w") as f:
        json.dump(pins, f)
    return python


# ----- our worker (runs in a fresh process of this interpreter) ----------------------------------------------------

def run_ours(s: dict) -> dict:
    """One end-to-end `dpo-jax train` run through the production loop, with its phases timed."""
    t_start = time.perf_counter()
    import jax

    from dpo_jax import compile_cache, reference
    from dpo_jax.data import storage
    from dpo_jax.train import run as train_run
    from transformers import AutoTokenizer  # noqa: F401  (imported lazily by the loop; TRL's is before its clock)

    t_imported = time.perf_counter()
    phases: dict[str, float] = {}

    def timed(module, name, key):
        original = getattr(module, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = original(*a, **k)
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - t
            return out
        setattr(module, name, wrapper)

    timed(reference, "precompute", "reference_s")
    timed(storage, "prepare", "data_s")

    run_dir = tempfile.mkdtemp(prefix="ours_run_", dir=s["work_dir"])
    c = train_run.default_run_config()
    m, d, t, o = c.model, c.data, c.train, c.optimizer
    m.source, m.path, m.scan_layers = "hf", s["model_dir"], s["scan_layers"]
    m.update(s.get("ours_model", {}))
    d.train_path, d.tokenizer, d.cache_dir = s["data_path"], s["tokenizer_dir"], os.path.join(run_dir, "cache")
    d.max_length, d.max_prompt_length, d.layout = s["max_length"], s["max_prompt_length"], s["layout"]
    d.seq_buckets = (s["seq_len"],) if s.get("seq_len") else ()
    d.update(s.get("ours_data", {}))
    t.global_batch_pairs, t.steps, t.seed = s["pairs"], s["steps"], s["seed"]
    t.log_every, t.save_every, t.eval_every, t.run_dir, t.tensorboard = 1, s["steps"], 0, run_dir, False
    c.dpo.loss_type, c.dpo.beta, c.dpo.reference = "sigmoid", s["beta"], "precompute"
    c.train.mode = s["mode"]
    o.name, o.learning_rate, o.warmup_steps, o.schedule, o.total_steps = "adamw", s["learning_rate"], 0, "linear", \
        s["steps"]
    o.weight_decay, o.clip_grad_norm = 0.0, s["clip_grad_norm"]

    t.global_batch_tokens = s.get("batch_tokens", 0)
    t.update(s.get("ours_train", {}))
    compile_cache.configure(d.cache_dir)  # as `dpo-jax train` does: on, here empty (the run's own cache directory)
    t0 = time.perf_counter()
    if d.layout == "packed":  # one epoch of the bench's pairs, however many (token-budget) steps that takes
        from dpo_jax.data.pipeline import build_loaders

        loaders = build_loaders(d, global_batch_pairs=t.global_batch_pairs, seed=t.seed, steps=1,
                                tokenizer=AutoTokenizer.from_pretrained(d.tokenizer),
                                global_batch_tokens=t.global_batch_tokens, exact_pairs=t.exact_pairs)
        t.steps = o.total_steps = t.save_every = loaders["train"].batches_in(0)
        loaders["train"].close()
    differs = config_changes(c, train_run.default_run_config())
    train_run.train(c)
    t_end = time.perf_counter()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"split": "train"' in line]
    step_s = [r["num_tokens"] / r["tokens_per_second"] for r in records]
    return {
        "system": "ours", "end_to_end_s": t_end - t0, "import_s": t_imported - t_start,
        "data_s": phases.get("data_s", 0.0), "reference_s": phases.get("reference_s", 0.0),
        "step_s": step_s, "losses": [r["loss"] for r in records],
        "pairs_per_step": statistics.mean(r["num_pairs"] for r in records),
        "tokens": {"processed_per_step": max(r["num_tokens"] for r in records), "layout": s["layout"]},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {"jax": jax.__version__}, "devices": [str(x) for x in jax.devices()], "config": differs,
    }


def config_changes(config, defaults, prefix: str = "") -> dict:
    """config.KEY: value for every leaf that differs from the defaults (what a reader needs to rerun a number)."""
    out, missing = {}, object()
    for key, value in config.items():
        base = defaults[key] if defaults is not None and key in defaults else missing
        if hasattr(value, "items"):
            out.update(config_changes(value, None if base is missing else base, f"{prefix}{key}."))
        elif base is missing or value != base:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


# ----- the driver ---------------------------------------------------------------------------------------------------

def peer_parser(doc: str, work_dir_name: str, systems: str) -> argparse.ArgumentParser:
    """The flags every peer bench (PPO, online DPO) shares; the caller adds its length flag."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=os.path.join(os.path.dirname(default_work_dir()), work_dir_name))
    p.add_argument("--out", default="")
    p.add_argument("--compile-cache", default="", help="a compile cache directory all our runs share: repeat 0 "
                   "compiles (cold), later repeats load (warm); default: each run's own, empty")
    p.add_argument("--systems", default=systems, help="comma-separated subset of " + systems.replace(",", ", "))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p


def peer_env(work_dir: str, compile_cache: str = "") -> dict:
    """The environment every run of a bench gets: offline, quiet, temporary files under the work directory, and
    no compile cache of the caller's (our runs start cold unless `compile_cache` is shared on purpose)."""
    env = {**os.environ, "TMPDIR": work_dir, "HF_HOME": os.path.join(work_dir, "hf"), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cache of the caller's would make our runs warm
    if compile_cache:
        env["DPO_JAX_COMPILE_CACHE"] = os.path.abspath(compile_cache)
    return env


def launch(python: str, script: str, s: dict, env: dict) -> dict:
    proc = subprocess.run([python, script, json.dumps(s)] if script.endswith("_worker.py")
                          else [python, script, "--worker", json.dumps(s)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{os.path.basename(script)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def steady(step_s: list[float]) -> float:
    return statistics.median(step_s[2:] if len(step_s) > 4 else step_s)


def summarize(runs: list[dict], tokens_per_pair: float, gflop_per_pair: float = 0.0) -> dict:
    """Per-repeat ratios (TRL time / our time: > 1 means we are faster) and medians per system."""
    by_repeat: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_repeat.setdefault(r["repeat"], {})[r["system"]] = r
    ratios = []
    for rep, group in sorted(by_repeat.items()):
        if "ours" not in group:  # --systems without ours: no ratios
            continue
        ours = group["ours"]
        row = {"repeat": rep}
        for trl in (s for s in SYSTEMS[1:] if s in group):
            row[f"end_to_end_vs_{trl}"] = group[trl]["end_to_end_s"] / ours["end_to_end_s"]
            row[f"steady_step_vs_{trl}"] = (steady(group[trl]["step_s"]) / group[trl]["pairs_per_step"]) / \
                (steady(ours["step_s"]) / ours["pairs_per_step"])  # per pair: token budgets vary the pairs
        ratios.append(row)
    systems = {}
    for name in SYSTEMS:
        rs = [r for r in runs if r["system"] == name]
        if not rs:
            continue
        systems[name] = {
            "end_to_end_s": statistics.median(r["end_to_end_s"] for r in rs),
            "reference_s": statistics.median(r["reference_s"] for r in rs),
            "data_s": statistics.median(r["data_s"] for r in rs),
            "steady_step_s": statistics.median(steady(r["step_s"]) for r in rs),
            "pairs_per_step": statistics.median(r["pairs_per_step"] for r in rs),
            "first_step_s": statistics.median(r["step_s"][0] for r in rs),
            "steady_tokens_per_s": statistics.median(tokens_per_pair * r["pairs_per_step"] / steady(r["step_s"])
                                                     for r in rs),
            # the step's real work (each pair's prompt once, both responses, no padding) per second
            "steady_real_gflop_per_s": statistics.median(gflop_per_pair * r["pairs_per_step"] / steady(r["step_s"])
                                                         for r in rs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "first_loss": rs[0]["losses"][0],
        }
    return {"ratios": ratios, "systems": systems,
            "median_ratios": {k: statistics.median(r[k] for r in ratios) for k in (ratios[0] if ratios else ())
                              if k != "repeat"}}


def real_gflop_per_pair(data_path: str, mode: str) -> float:
    """Model GFLOPs of a train step's real work per pair (dpo_jax/flops.py): the prompt once and both responses
    (+ EOS) with attention over the pair's own length, the unembedding on the scored tokens only; DPO only
    (0 for --mode reward)."""
    if mode != "dpo":
        return 0.0
    from dpo_jax.flops import train_step_flops
    from dpo_jax.models.config import shaped_config

    config = shaped_config("gpt2", MODEL["vocab_size"], MODEL["hidden_size"], MODEL["num_layers"],
                           MODEL["num_heads"], MODEL["intermediate_size"])
    total = []
    with open(data_path) as f:
        for r in map(json.loads, f):
            p, c, j = (len(r[k].split()) for k in ("prompt", "chosen", "rejected"))
            scored = c + j + 2
            total.append(train_step_flops(config, 1, p + scored, scored))
    return statistics.mean(total) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="dpo", choices=("dpo", "reward"),
                   help="dpo: DPOTrainer (default and precompute); reward: a reward model vs TRL's RewardTrainer")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--layout", default="packed", choices=("packed", "shared_prompt", "pairs"),
                   help="our batch layout (config.data.layout); TRL always runs a row per response")
    p.add_argument("--lengths", default="fixed", choices=tuple(LENGTH_LIMITS),
                   help="fixed 48 + 80 tokens, or HH-shaped ragged lengths, or those with a longer tail (see the "
                   "module docstring)")
    p.add_argument("--seq-len", type=int, default=0, help="our row length (config.data.seq_buckets=(N,)); 0: the "
                   "layout's default (the longest row of the data)")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="ours: an explicit token budget (config.train.global_batch_tokens, packed layout); 0: the "
                   "default, a budget derived from the data for --pairs (config.train.exact_pairs: --ours-train). "
                   "Ours runs one epoch of the same pairs; steady steps are compared per pair")
    p.add_argument("--compile-cache", default="", help="a compile cache directory all our runs share: repeat 0 "
                   "compiles (cold), later repeats load (warm); default: each run's own, empty")
    p.add_argument("--ours-train", default="", help="KEY=VALUE,...: our config.train fields (e.g. exact_pairs=true)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    p.add_argument("--ours-model", default="", help="KEY=VALUE,...: our config.model fields for this invocation "
                   "(e.g. attention_query_block=0 against the default)")
    p.add_argument("--ours-data", default="", help="KEY=VALUE,...: our config.data fields (e.g. pack_lookahead=1)")
    p.add_argument("--work-dir", default=default_work_dir())
    p.add_argument("--out", default="", help="write the runs and the summary here as JSON")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_ours(json.loads(args.worker))), flush=True)
        return

    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    python = trl_python(work_dir)
    s = settings(args, work_dir)
    shutil.rmtree(s["tokenizer_dir"], ignore_errors=True)
    write_tokenizer(s["tokenizer_dir"], MODEL["vocab_size"])
    write_checkpoint(s["model_dir"], args.seed, s["tokenizer_dir"])
    write_pairs(s["data_path"], args.steps * args.pairs, MODEL["vocab_size"], args.seed, args.lengths)
    # Both systems keep every cache under the work directory, fresh per run (no cache hits across runs).
    env = {**os.environ, "TMPDIR": work_dir, "HF_HOME": os.path.join(work_dir, "hf"), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("XLA_FLAGS", None)  # one real CPU device, as a user's run on this machine
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cache of the caller's would make our runs warm
    # Our compile cache: each run's own, empty (cold), unless --compile-cache shares one (repeat 0 fills it).
    ours_env = {"DPO_JAX_COMPILE_CACHE": os.path.abspath(args.compile_cache)} if args.compile_cache else {}
    runs = []
    systems = [x for x in (SYSTEMS if args.mode == "dpo" else SYSTEMS[:2]) if x in args.systems.split(",")]
    for rep in range(args.repeats):
        for system in systems:
            if system == "ours":
                r = launch(sys.executable, os.path.abspath(__file__), s, {**env, **ours_env})
                if rep == 0:  # which flags made our numbers (paths are this run's)
                    print("ours: config as run, where it differs from the defaults: " +
                          " ".join(f"{k}={v}" for k, v in r["config"].items()), flush=True)
            else:
                trl_s = {**s, "precompute": system == "trl_precompute"}
                r = launch(python, os.path.join(HERE, "trl_worker.py"), trl_s, env)
                r["pairs_per_step"] = args.pairs
            r["repeat"] = rep
            runs.append(r)
            print(f"repeat {rep} {system:15s} end-to-end {r['end_to_end_s']:7.1f} s | reference "
                  f"{r['reference_s']:5.1f} s | steady step {steady(r['step_s']):.3f} s | first step "
                  f"{r['step_s'][0]:.2f} s | first loss {r['losses'][0]:.4f} | peak RSS {r['peak_rss_mib']:,.0f} MiB",
                  flush=True)
        clean_work_dir(work_dir)
    with open(s["data_path"]) as f:  # real tokens of a step as two rows per pair (+ 2 EOS): the common measure
        real = [len(r["prompt"].split()) * 2 + len(r["chosen"].split()) + len(r["rejected"].split()) + 2
                for r in map(json.loads, f)]
    summary = summarize(runs, statistics.mean(real), real_gflop_per_pair(s["data_path"], args.mode))
    for row in summary["ratios"]:
        print(f"repeat {row['repeat']}: " + ", ".join(f"{k.replace('_vs_', ' vs ')} {v:.2f}x" for k, v in row.items()
                                                    if k != "repeat"))
    print("median ratios:", json.dumps({k: round(v, 3) for k, v in summary["median_ratios"].items()}))
    write_result(args.out, s, summary=summary, runs=runs)


def clean_work_dir(work_dir: str) -> None:
    """Removes the runs' directories and dataset caches; keeps the virtualenvs and the inputs."""
    for d in os.listdir(work_dir):
        if d.startswith(("ours_run_", "trl_run_", "tunix_run_", "tmp")) or d == "hf":
            shutil.rmtree(os.path.join(work_dir, d), ignore_errors=True)


def write_result(out: str, settings: dict, **payload) -> None:
    """A bench's JSON record (when `out` is set): the command that made it, the machine, the settings, results."""
    if not out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                               "processor": platform.processor()},
                   "settings": {k: v for k, v in settings.items() if k != "work_dir"}, **payload}, f, indent=1)


if __name__ == "__main__":
    main()
