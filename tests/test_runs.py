"""Runs end to end on the tiny configs: exact resume after SIGKILL, SIGTERM save, NaN stop, mismatch, export."""

import json
import os
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as T

from dpo_jax import reference
from dpo_jax.commands import evaluate as eval_command
from dpo_jax.config import load_config_file
from dpo_jax.data.tokenizers import load_tokenizer
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import Decoder, logits
from dpo_jax.train import model_source
from dpo_jax.train import run as train_run
from dpo_jax.train.export import export
from dpo_jax.train.trainer import RunError
from tests.conftest import xla_flags_with_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
TIMING = {"tokens_per_second", "mfu"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _overrides(run_dir, cache, **extra):
    base = {"train.run_dir": str(run_dir), "data.cache_dir": cache, "train.steps": 12, "train.log_every": 3,
            "train.save_every": 4, "train.eval_samples": 0, "data.eval_path": "", "train.tensorboard": False}
    return {**base, **extra}


def _config(mode, overrides):
    c = load_config_file(f"{TINY}:{mode}")
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _cli(overrides, mode="dpo", command="train"):
    return [sys.executable, "-m", "dpo_jax.main", command, "--config", f"{TINY}:{mode}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()]


def kill_and_resume(cli, marker):
    """Runs `cli`, SIGKILLs it when a line starts with `marker`, runs it again; the second run must resume."""
    proc = subprocess.Popen(cli, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    out = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stderr[-3000:]
    return out


def assert_same_lines(got, want, rel=1e-6, abs=1e-7):
    """Metric lines equal key by key: numbers to within rel/abs, strings (the split) exactly."""
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), g["step"]
        for k in w:
            if isinstance(w[k], str):
                assert g[k] == w[k], (g["step"], k)
            else:
                assert g[k] == pytest.approx(w[k], rel=rel, abs=abs), (g["step"], k)


def _train_lines(run_dir, timing=False):
    """The train split's metric lines; without the timing-dependent keys unless `timing`."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if timing or k not in TIMING} for r in rows if r["split"] == "train"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, cache):
    train_run.train(_config("dpo", _overrides(tmp_path / "straight", cache)))
    want = _train_lines(tmp_path / "straight")
    assert [r["step"] for r in want] == [3, 6, 9, 12]
    assert want[0]["loss"] < 0.7 and want[-1]["rewards/accuracies"] > want[0]["rewards/accuracies"] - 0.2

    overrides = _overrides(tmp_path / "killed", cache)
    proc = subprocess.Popen(_cli(overrides), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("[train] step 9"):  # checkpoints 4 and 8 exist (8 mid-window: log_every 3)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    out = subprocess.run(_cli(overrides), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    resumed = train_run.build_run(_config("dpo", overrides))  # the engine hands out the restored state
    resumed.close()
    assert resumed.start == 12 and not any(x.is_deleted() for x in jax.tree.leaves(resumed.engine.state))
    got = _train_lines(tmp_path / "killed")
    assert [r["step"] for r in got] == [3, 6, 9, 12]
    assert_same_lines(got, want)


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, cache):
    overrides = _overrides(tmp_path / "run", cache, **{"train.steps": 10000, "train.save_every": 10000,
                                                         "train.log_every": 1})
    proc = subprocess.Popen(_cli(overrides), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[train] step 3"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + rest
    message = next(line for line in rest.splitlines() if line.startswith("SIGTERM: saved checkpoint at step"))
    step = int(message.split("step ")[1].split(" ")[0])
    assert step >= 3 and os.path.isdir(tmp_path / "run" / "checkpoints" / str(step))


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, cache, capsys):
    """Multi-host preemption: only process 1 gets SIGTERM; both agree on a step (JAX's preemption sync point), save
    it together and exit 0; the run then resumes from that step."""
    import socket

    overrides = _overrides(tmp_path / "run", cache, **{"train.steps": 10000, "train.save_every": 10000,
                                                         "train.log_every": 1})
    train_run.precompute(_config("dpo", overrides))  # tokenizer, data and reference caches: built once, not raced
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": xla_flags_with_devices(2), "JAX_PLATFORMS": "cpu"}
    procs, logs = [], []
    for i in range(2):
        cli = _cli({**overrides, "distributed.mode": "explicit", "distributed.coordinator_address":
                    f"127.0.0.1:{port}", "distributed.num_processes": 2, "distributed.process_id": i})
        logs.append(open(tmp_path / f"process{i}.log", "w+"))
        procs.append(subprocess.Popen(cli, cwd=REPO, stdout=subprocess.PIPE if i == 0 else logs[i],
                                      stderr=subprocess.STDOUT, text=True, env=env))
    try:
        for line in procs[0].stdout:
            logs[0].write(line)
            if line.startswith("[train] step 3"):
                procs[1].send_signal(signal.SIGTERM)
                break
        logs[0].write(procs[0].communicate(timeout=180)[0])
        procs[1].wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    saved = []
    for i, log in enumerate(logs):
        log.seek(0)
        text = log.read()
        assert procs[i].returncode == 0, text[-3000:]
        saved.append(int(text.split("SIGTERM: saved checkpoint at step ")[1].split(" ")[0]))
    assert saved[0] == saved[1] >= 3
    capsys.readouterr()
    train_run.train(_config("dpo", {**overrides, "train.steps": saved[0] + 2}))
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'}/{saved[0]}" in capsys.readouterr().out
    assert [r["step"] for r in _train_lines(tmp_path / "run")][-2:] == [saved[0] + 1, saved[0] + 2]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cache):
    c = _config("dpo", _overrides(tmp_path / "run", cache, **{"train.save_every": 1, "train.log_every": 1}))
    c.optimizer.learning_rate = 1e30
    with pytest.raises(RunError, match=r"non-finite loss or gradient at step (\d+) \(example ids \[\d+") as e:
        train_run.train(c)
    bad = int(str(e.value).split("at step ")[1].split(" ")[0])
    saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert saved and max(saved) == bad - 1 and f"step {bad - 1}" in str(e.value)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("finished")
    train_run.train(_config("dpo", _overrides(run_dir, cache, **{"train.steps": 4})))
    return run_dir


def test_a_checkpoint_for_another_model_or_mode_is_refused(finished_run, cache):
    c = _config("dpo", _overrides(finished_run, cache, **{"train.steps": 8}))
    c.model.hidden_size = 32
    with pytest.raises(ValueError, match=r"different model \(.*hidden_size: 64 vs 32"):
        train_run.train(c)
    c = _config("sft", _overrides(finished_run, cache, **{"train.steps": 8}))
    with pytest.raises(ValueError, match="written in mode 'dpo', this run is 'sft'"):
        train_run.train(c)
    saved = json.loads((finished_run / "config.json").read_text())
    assert saved["train"]["mode"] == "dpo" and saved["model"]["hidden_size"] == 64  # the run's files untouched


def test_export_loads_in_transformers_with_the_same_logits(finished_run, tmp_path):
    step, files = export(str(finished_run), str(tmp_path / "hf"))
    assert step == 4 and files
    hf = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    tokenizer = T.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = np.asarray([tokenizer("\n\nHuman: What colour is snow?\n\nAssistant: Sure!")["input_ids"]])
    import torch

    with torch.no_grad():
        want = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    model = ModelConfig.from_json((finished_run / "model_config.json").read_text())
    from dpo_jax.convert.hf import load_hf_checkpoint

    config, params = load_hf_checkpoint(str(tmp_path / "hf"))
    got = np.asarray(logits(params, config, Decoder(config).apply({"params": params}, jnp.asarray(ids))))
    assert config.hidden_size == model.hidden_size
    np.testing.assert_allclose(got, want, atol=1e-4)
    out = subprocess.run([sys.executable, "-m", "dpo_jax.main", "export", "--run", str(finished_run), "--to-hf",
                          str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "exists and is not empty" in out.stderr


def test_dpo_starts_from_an_exported_hf_checkpoint(finished_run, tmp_path, cache):
    export(str(finished_run), str(tmp_path / "hf"))
    c = _config("dpo", _overrides(tmp_path / "from_hf", cache, **{"train.steps": 2, "train.log_every": 1}))
    c.model.source, c.model.path, c.data.tokenizer = "hf", str(tmp_path / "hf"), ""  # tokenizer from the model dir
    train_run.train(c)
    first = _train_lines(tmp_path / "from_hf")[0]
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy = its own reference at step 1
    model = ModelConfig.from_json((tmp_path / "from_hf" / "model_config.json").read_text())
    assert model.hidden_size == 64 and model.param_dtype == "float32"


@pytest.mark.parametrize("mode", ["sft", "unlikelihood", "ipo"])
def test_tiny_configs_run_end_to_end_with_eval_and_samples(mode, tmp_path, cache):
    overrides = _overrides(tmp_path / mode, cache, **{"train.steps": 4, "train.log_every": 2, "train.eval_samples": 1,
                                                        "data.eval_path": os.path.join(REPO, "configs", "data",
                                                                                       "tiny_hh", "eval.jsonl")})
    last = train_run.train(_config(mode, overrides))
    assert np.isfinite(last["loss"])
    rows = [json.loads(line) for line in open(tmp_path / mode / "metrics.jsonl")]
    assert {r["split"] for r in rows} == {"train", "eval"}
    samples = [json.loads(line) for line in open(tmp_path / mode / "samples.jsonl")]
    assert {s["model"] for s in samples} >= {"policy"} and all("completion" in s for s in samples)
    assert os.path.isdir(tmp_path / mode / "checkpoints" / "4")


def test_cli_train_rejects_unknown_keys_with_a_suggestion():
    out = subprocess.run([sys.executable, "-m", "dpo_jax.main", "train", "--config", TINY, "--config.dpo.bta=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "did you mean --config.dpo.beta?" in out.stderr
    out = subprocess.run([sys.executable, "-m", "dpo_jax.main", "train", "--config.data.train_path="],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "config.data.tokenizer is empty" in out.stderr


def test_precompute_then_eval_commands(tmp_path, cache):
    eval_path = os.path.join(REPO, "configs", "data", "tiny_hh", "eval.jsonl")
    c = _config("dpo", _overrides(tmp_path / "run", cache, **{"data.eval_path": eval_path, "train.steps": 2}))
    train_run.precompute(c)
    record = json.loads((tmp_path / "run" / "reference.json").read_text())["paths"]
    assert set(record) == {"train", "eval"} and all(os.path.isfile(p) for p in record.values())
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # nothing trained
    train_run.train(c)
    eval_command.evaluate(c)  # the latest checkpoint (step 2) on the eval split, logged once more at step 2
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 2] and evals[0]["loss"] == pytest.approx(evals[1]["loss"], rel=1e-6)


def test_shared_prompt_layout_trains_like_the_pairs_layout_on_fewer_tokens(tmp_path, cache, monkeypatch, capsys):
    """Both layouts with their score windows, and the shared layout without one: the same run, step by step."""
    runs, windows, build = {}, {}, train_run.build_engine

    def recording_build(*args, score_window=0, **kwargs):
        windows[name] = score_window
        return build(*args, score_window=0 if name == "no_window" else score_window, **kwargs)

    monkeypatch.setattr(train_run, "build_engine", recording_build)
    for name, layout in (("pairs", "pairs"), ("shared_prompt", "shared_prompt"), ("no_window", "shared_prompt")):
        c = _config("dpo", _overrides(tmp_path / name, cache, **{"train.steps": 3, "train.log_every": 1}))
        c.data.layout = layout
        train_run.train(c)
        runs[name] = _train_lines(tmp_path / name)
    assert f"the unembedding runs on at most {windows['pairs']} positions per row" in capsys.readouterr().out
    assert 0 < windows["pairs"] < c.data.max_length and 0 < windows["shared_prompt"] < c.data.max_length
    for name in ("shared_prompt", "no_window"):
        for want, got in zip(runs["pairs"], runs[name]):
            for key in ("loss", "rewards/margins", "grad_norm", "logps/rejected"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (name, key)
            assert got["num_tokens"] < want["num_tokens"]  # each prompt ran once
    c = _config("dpo", _overrides(tmp_path / "bad", cache))
    c.data.layout = "interleaved"
    with pytest.raises(ValueError, match="config.data.layout = 'interleaved'; valid: pairs, shared_prompt, packed"):
        train_run.train(c)


def test_a_relaunch_with_other_data_settings_recomputes_the_reference_tables(tmp_path, cache, capsys):
    """reference.json is re-checked against the weights' source, the data and the settings; a relaunch in the same
    run directory with another max_length trains against the new tables, not the stale ones."""
    train_run.precompute(_config("dpo", _overrides(tmp_path / "run", cache)))
    stale = json.loads((tmp_path / "run" / "reference.json").read_text())["paths"]["train"]
    changed = _overrides(tmp_path / "run", cache, **{"data.max_length": 40, "data.max_prompt_length": 24})
    run = train_run.build_run(_config("dpo", changed))
    run.close()
    assert "were computed for another data; recomputing" in capsys.readouterr().out
    fresh = train_run.build_run(_config("dpo", {**changed, "train.run_dir": str(tmp_path / "fresh")}))
    fresh.close()
    got, want = run.reference.tables["train"], fresh.reference.tables["train"]
    old = reference.ReferenceTable.load(stale)
    np.testing.assert_array_equal(got.example_ids, want.example_ids)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-6)
    assert not np.allclose(old.values[:, 0], got.lookup(old.example_ids)["ref_chosen_logps"])  # truncation bit
    again = train_run.build_run(_config("dpo", changed))  # unchanged now: the recorded tables are reused
    again.close()
    assert "recomputing" not in capsys.readouterr().out


def test_mfu_counts_each_step_at_its_own_bucket_length(tmp_path, cache):
    """With seq_buckets the steps of one logging window have different lengths; the MFU sums their FLOPs."""
    from dpo_jax.data.pipeline import build_loaders
    from dpo_jax.flops import train_step_flops

    overrides = _overrides(tmp_path / "run", cache, **{
        "data.seq_buckets": "(16,24,32,40,48,56,64)", "data.layout": "shared_prompt", "train.global_batch_pairs": 2,
        "train.steps": 8,
        "train.log_every": 4, "train.peak_tflops_per_device": 1.0, "mesh.data": 1})
    env = {**os.environ, "XLA_FLAGS": xla_flags_with_devices(1)}  # 2 pairs a step: one device
    out = subprocess.run(_cli(overrides), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    c = _config("dpo", {**overrides, "data.seq_buckets": (16, 24, 32, 40, 48, 56, 64)})
    tokenizer = load_tokenizer(c.data, model_source.tokenizer_dir(c.model))
    loader = build_loaders(c.data, global_batch_pairs=2, seed=c.train.seed, tokenizer=tokenizer)["train"]
    lengths = [loader.batch_at(0, k)["input_ids"].shape[1] for k in range(8)]
    loader.close()
    model, _ = model_source.model_loader(c.model, len(tokenizer))
    flops = [train_step_flops(model, 2, t, loader.score_window) for t in lengths]  # shared prompt: a row per pair
    assert len(set(lengths[:4])) > 1 and len(set(lengths[4:])) > 1  # the buckets do vary within a window
    for row, window in zip(_train_lines(tmp_path / "run", timing=True), (flops[:4], flops[4:])):
        elapsed = row["num_tokens"] * 4 / row["tokens_per_second"]
        assert row["mfu"] * elapsed * 1e12 == pytest.approx(sum(window), rel=1e-5)


def test_per_batch_reference_matches_the_precomputed_tables(tmp_path, cache):
    pre = train_run.train(_config("dpo", _overrides(tmp_path / "pre", cache, **{"train.steps": 3,
                                                                                 "train.log_every": 3})))
    c = _config("dpo", _overrides(tmp_path / "per", cache, **{"train.steps": 3, "train.log_every": 3}))
    c.dpo.reference = "per_batch"
    per = train_run.train(c)
    assert not os.path.exists(tmp_path / "per" / "reference.json")
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert per[key] == pytest.approx(pre[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("reference", ["precompute", "per_batch"])
def test_the_train_step_compiles_once_on_a_background_thread(tmp_path, cache, reference):
    """The compile started before the reference pass is the one the first step uses (no second compile)."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and "train_step" in kwargs.get("fun_name", ""):
            compiles.append(threading.current_thread() is threading.main_thread())

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        c = _config("dpo", _overrides(tmp_path / "run", cache, **{"train.steps": 2, "train.log_every": 1}))
        c.dpo.reference = reference
        train_run.train(c)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [False]  # one compile, not on the main thread


def test_itstime_runs_periodic_actions_every_n_steps_and_after_the_last():
    from dpo_jax.metrics import itstime

    assert [s for s in range(1, 11) if itstime(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if itstime(s, 0, 10)] == [10]  # 0: at the end only
    assert [s for s in range(1, 7) if itstime(s, 3, 6)] == [3, 6]
