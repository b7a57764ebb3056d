"""`dpo-jax plan` on a v5e:2x2 topology's abstract devices (libtpu from the test extra; nothing runs on a TPU): its
figures are the compiled executable's, grow with the batch, a run that cannot fit says so, `--fit` returns settings
that fit, the programs are those `train` builds, and the shape presets are the models they name."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpo_jax.compile_target import compiling_for
from dpo_jax.config import load_config_file
from dpo_jax.convert.hf import read_hf_config
from dpo_jax.convert.presets import HF_PRESETS, preset_config
from dpo_jax.models.decoder import init_params
from dpo_jax.plan.chips import topology_devices
from dpo_jax.plan.fit import fit
from dpo_jax.plan.programs import collectives_of
from dpo_jax.plan.estimate import plan_programs
from dpo_jax.plan.run_plan import planned_batch, planned_engine, planned_model, planned_shape, programs_of
from dpo_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def devices():
    return topology_devices("v5e:2x2")


def tiny(**changes):
    c = load_config_file(TINY)
    c.data.layout = "pairs"
    c.data.eval_path, c.train.eval_samples = "", 0  # programs: the train step and the reference pass
    for key, value in changes.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def test_memory_is_the_executables_and_grows_with_the_batch(devices):
    plans = {}
    for pairs in (8, 16):
        c = tiny(**{"train.global_batch_pairs": pairs, "train.mode": "sft"})  # one program: the train step
        plans[pairs], info = plan_programs(c, devices, with_estimate=False)
        assert info["batch"] == {"pairs": pairs, "rows": 2 * pairs, "seq_len": c.data.max_length}
    # the plan's figures are the compiled executable's own
    c = tiny(**{"train.global_batch_pairs": 8, "train.mode": "sft"})
    mesh = make_mesh(c.mesh, devices)
    with compiling_for("tpu"):
        engine = planned_engine(c, planned_model(c), mesh)
        jitted, args = programs_of(c, engine, planned_batch(c, planned_shape(c, 4)))["train_step"]
        memory = jitted.lower(*args).compile().memory_analysis()
    small, large = plans[8]["train_step"].compiled, plans[16]["train_step"].compiled
    assert (small.argument_bytes, small.temp_bytes, small.output_bytes) == \
        (memory.argument_size_in_bytes, memory.temp_size_in_bytes, memory.output_size_in_bytes)
    # doubling the pairs adds each device's share of the extra rows to its arguments (the state is the same; TPU
    # tiles pad small arrays, hence the range)
    batch = planned_batch(c, planned_shape(c, 4))
    rows_bytes = sum(v.nbytes for k, v in batch.items() if k in engine.config.layout.row_keys) // 4
    assert rows_bytes <= large.argument_bytes - small.argument_bytes <= 2 * rows_bytes
    assert plans[16]["train_step"].total_bytes > plans[8]["train_step"].total_bytes
    assert all(p.fits for p in plans[16].values())


def test_a_run_that_cannot_fit_is_reported_as_not_fitting(devices):
    c = tiny(**{"model.hidden_size": 8192, "model.intermediate_size": 32768, "model.num_heads": 64,
                "mesh.data": 4, "train.mode": "sft"})  # 1.6 B float32 parameters on every 16 GiB chip, and RMSprop
    plans, _ = plan_programs(c, devices, with_estimate=False)
    train = plans["train_step"]
    assert not train.fits
    assert train.compiled.error or train.total_bytes > train.hbm_bytes


def test_fit_returns_settings_that_fit_and_are_the_fastest_tried(devices):
    """Two pairs on four chips do not split over four data-parallel devices: --fit goes to a tensor-parallel size
    of 2, where they do."""
    c = tiny(**{"train.global_batch_pairs": 2, "train.mode": "sft"})
    c.mesh.rules = tuple((name, None if name == "vocab" else axes) for name, axes in c.mesh.rules)  # 471 tokens
    found, (chosen_plans, chosen_info) = fit(c, devices, policies=("dots", "full"))  # two of three: the suite's time
    assert found["tried"][0] == {"tensor": 1, "fits": False,
                                 "error": "the batch does not split over 4 data-parallel devices"}
    assert found["overrides"] == ["--config.mesh.tensor=2", f"--config.model.remat_policy={found['remat_policy']}",
                                  f"--config.train.micro_batches={found['micro_batches']}"]
    timed = [t for t in found["tried"] if "estimated_step_seconds" in t]
    assert timed and all(t["fits"] and t["tensor"] == 2 for t in timed)
    assert found["estimated_step_seconds"] == min(t["estimated_step_seconds"] for t in timed)
    # the plan handed back is the chosen settings' own, compiled, fitting and estimated
    assert (chosen_info["model"]["remat_policy"], chosen_info["micro_batches"]) == (found["remat_policy"],
                                                                                  found["micro_batches"])
    assert chosen_info["mesh"]["tensor"] == 2
    assert all(p.fits for p in chosen_plans.values())
    assert chosen_plans["train_step"].estimated_step_seconds == found["estimated_step_seconds"]


def test_plan_builds_the_programs_train_builds(tmp_path):
    """No drift: on the same (CPU) mesh, plan's abstract state and batch equal what build_run makes for training."""
    from dpo_jax.train.run import build_run

    c = tiny(**{"train.global_batch_pairs": 8})
    c.data.cache_dir, c.train.run_dir = str(tmp_path / "cache"), str(tmp_path / "run")
    run = build_run(c)
    try:
        train = run.engine
        first = run.loaders["train"].batch_at(0, 0)
        planned = planned_engine(c, planned_model(c), train.mesh)
        shape = planned_shape(c, 8)
        spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding.spec), tree)  # noqa: E731
        assert spec(planned.state) == spec(jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding), train.state))
        assert spec(planned.abstract_batch(planned_batch(c, shape))) == spec(train.abstract_batch(first))
        # the same step, but for the score window: train's is planned from the data, plan's is the whole row (at most)
        assert planned.config.score_window == 0 < train.config.score_window
        assert dataclasses.replace(planned.config, score_window=train.config.score_window) == train.config
    finally:
        run.close()


def test_cli_plan_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "dpo_jax.main", "plan", "--config", TINY, "--topology", "v5e:2x2",
                             "--config.model.scan_layers=True", "--out", str(out)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_step" in result.stdout and "fits: yes" in result.stdout
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["topology"] == "v5e:2x2" and plan["run"]["devices"] == 4
    for name, program in plan["programs"].items():
        for key in ("fits", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes", "hbm_bytes",
                    "estimated_step_seconds", "estimated_mfu", "collectives", "compile_seconds"):
            assert key in program, (name, key)
        assert program["estimated_step_seconds"] > 0 and 0 < program["estimated_mfu"] < 1
        # the compiler's FLOPs (loop-free variants, extrapolated) against flops.py's: remat recomputes some forward
        ratio = program["estimated_flops"] / program["model_flops"]
        assert 0.9 < ratio < (1.6 if name == "train_step" else 1.2), (name, ratio)
        assert program["estimate_method"] == "scanned"


def test_the_scanned_estimate_agrees_with_the_variants_and_flops_py(devices):
    """Two ways past the compiler's once-per-loop-body count — the scanned program with its layer scan unrolled by 2
    (and chunks twice as long), and unscanned 1-/2-layer variants — agree on FLOPs and collective bytes, and with
    flops.py and the gradients' all-reduce."""
    from dpo_jax.flops import train_step_flops
    from dpo_jax.plan.estimate import scanned_estimate, variant_estimate
    from dpo_jax.sharding import data_parallel_size

    c = tiny(**{"train.global_batch_pairs": 8, "model.num_layers": 4, "model.scan_layers": True,
                "train.logprob_chunk_size": 32})  # two chunks a row: the chunk slope is counted too
    mesh = make_mesh(c.mesh, devices)
    model, dp = planned_model(c), data_parallel_size(mesh, c.mesh.rules)
    scanned = scanned_estimate(c, model, mesh, dp)
    variants = variant_estimate(c, model, mesh, dp)
    train_flops = train_step_flops(model, 16, c.data.max_length)
    for name, ours in (("train_step", train_flops), ("reference_step", train_flops / 3)):
        assert scanned[name][0] == pytest.approx(variants[name][0], rel=0.03), name
        ratio = scanned[name][0] * len(devices) / ours
        assert 0.9 < ratio < (1.6 if name == "train_step" else 1.2), (name, ratio)
        assert scanned[name][2] == pytest.approx(variants[name][2], rel=0.05), name  # collective bytes alike
    # data-parallel over 4 chips: the step's collectives are the float32 gradients' ring all-reduce, 2 * 3/4 of them
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    gradient_bytes = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert dict(mesh.shape)["data"] == 4 and model.param_dtype == "float32"
    assert 1.0 < scanned["train_step"][2] / (2 * 3 / 4 * gradient_bytes) < 1.2


def test_a_count_outside_what_remat_explains_fails_the_flops_check():
    """The scanned estimate falls back to the variants when its count is off flops.py's by more than remat (and the
    kernel's recomputation) explain — as on two v5p-64 slices, where the two-layer copy counted 2.14x."""
    from dpo_jax.plan.estimate import beyond_flops_check, negative_counts
    from dpo_jax.plan.programs import Compiled
    from dpo_jax.plan.run_plan import ProgramPlan

    plans = {name: ProgramPlan(name, Compiled(), 0, 2**34, model_flops=4.0e12)
             for name in ("train_step", "reference_step")}
    assert beyond_flops_check({"train_step": (1.27e12, 0, 0), "reference_step": (1.0e12, 0, 0)}, plans, 4) == []
    assert beyond_flops_check({"train_step": (2.14e12, 0, 0), "reference_step": (1.3e12, 0, 0)}, plans, 4) == [
        "train_step: 2.14", "reference_step: 1.30"]
    # an extrapolation below zero (a counted copy moved fewer bytes than the program) is refused too
    assert negative_counts({"train_step": (1.27e12, 5.0, -3.0), "reference_step": (1.0e12, 5.0, 2.0)}) == [
        "train_step"]


def test_windowed_matmul_loops_are_off_when_counting():
    """FSDP over a v5p-64: the compiler windows the weights' all-gather into one loop per matmul, each counted once;
    compiled for its counts (COUNTING_OPTIONS) the program has no such loop. (Llama-3.2-1B's shape cut to 2 layers:
    the windowing needs weights this large.)"""
    from dpo_jax.plan.programs import COUNTING_OPTIONS

    c = load_config_file(os.path.join(ROOT, "configs", "dpo_hh.py"))
    # 256-token rows: the windowing is the weights' (gone at 64 tokens); 1,024 compiled 1.6x slower (the suite's time)
    c.model.preset, c.data.layout, c.data.max_length, c.data.max_prompt_length = "llama3.2-1b", "pairs", 256, 128
    c.data.eval_path, c.train.eval_samples, c.train.global_batch_pairs, c.train.micro_batches = "", 0, 32, 1
    mesh = make_mesh(c.mesh, topology_devices("v5p-64"))
    with compiling_for("tpu"):
        engine = planned_engine(c, planned_model(c).replace(num_layers=2), mesh)
        jitted, args = programs_of(c, engine, planned_batch(c, planned_shape(c, 32)))["reference_step"]
        lowered = jitted.lower(*args)
        assert "windowed_dot_general" in lowered.compile().as_text()
        assert "windowed_dot_general" not in lowered.compile(compiler_options=COUNTING_OPTIONS).as_text()


def test_bad_topology_names_the_flag():
    with pytest.raises(ValueError, match="--topology 'v9z:1x1'"):
        topology_devices("v9z:1x1")


def test_collectives_are_counted_with_their_bytes():
    """Bytes: each op's result (an async start's: the second of its tuple); traffic: what a device receives with
    ring algorithms over its group, the group read from each of the three forms the compiler writes."""
    text = ("  %all-gather.1 = bf16[512,8,128]{2,1,0} all-gather(%p), replica_groups={{0,1,2,3}}\n"
            "  %ar = (f32[4]{0}, f32[2,2]{1,0}) all-reduce(%a, %b), replica_groups=[2,4]<=[8], to_apply=%add\n"
            "  %rs-start = (f32[8]{0}, f32[4]{0}) reduce-scatter-start(%c), replica_groups=mesh['axis_0'=2,"
            "'axis_1'=4] {'axis_0'}, dimensions={0}\n"
            "  %cp = (f32[6]{0}, f32[6]{0}, u32[], u32[]) collective-permute-start(%d), source_target_pairs={{0,1}}\n"
            "  %x = f32[4]{0} add(%a, %b)\n")
    gathered = 512 * 8 * 128 * 2
    assert collectives_of(text) == {
        "all-gather": {"count": 1, "bytes": gathered, "traffic_bytes": gathered * 3 / 4},
        "all-reduce": {"count": 1, "bytes": 32, "traffic_bytes": 2 * 32 * 3 / 4},
        "reduce-scatter": {"count": 1, "bytes": 16, "traffic_bytes": 16 * 1},
        "collective-permute": {"count": 1, "bytes": 24, "traffic_bytes": 24}}


@pytest.mark.parametrize("name", sorted(HF_PRESETS))
def test_presets_are_the_models_they_name(name, tmp_path):
    """Each preset reads through the family table; a directory holding only its config.json plans the same model."""
    config = preset_config(name)
    expected = {"llama3.2-1b": 1.24e9, "llama3-8b": 8.03e9, "llama3-70b": 70.6e9, "qwen3-8b": 8.19e9,
                "qwen3-0.6b": 0.60e9, "mistral-7b": 7.24e9, "gptj-6b": 6.05e9,
                "pythia-2.8b": 2.78e9}[name]  # the models' published sizes
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert abs(count - expected) / expected < 0.02, count
    (tmp_path / "config.json").write_text(json.dumps(HF_PRESETS[name]))
    assert read_hf_config(str(tmp_path))[1] == config
    c = tiny(**{"model.source": "hf", "model.path": str(tmp_path)})
    c.model.scan_layers, c.model.remat_policy = config.scan_layers, config.remat_policy
    c.model.dtype, c.model.param_dtype, c.model.attention_query_block = config.dtype, config.param_dtype, 0
    assert planned_model(c).replace(attention_query_block=0) == config


def test_accelerator_types_name_their_slices():
    from dpo_jax.plan.chips import topology_name

    assert [topology_name(n) for n in ("v5p-64", "v5litepod-16", "v6e-8", "v5e-256", "v5p-128", "v5e:4x4")] == \
        ["v5p:2x4x4", "v5e:4x4", "v6e:2x4", "v5e:16x16", "v5p:4x4x4", "v5e:4x4"]
    with pytest.raises(ValueError, match="no standard slice shape"):
        topology_name("v5e-12")


def test_a_ppo_config_plans_its_four_programs(devices):
    """A `dpo-jax ppo` config: generation, the reward model's scoring pass, the reference/value pass and the update
    are compiled, with what else the run holds counted beside each, and estimated: the compiler's FLOPs of the
    loop-free variants, scaled by layers, decode steps and epochs x minibatches, come out at flops.py's count."""
    from dpo_jax.plan.ppo_plan import plan_ppo

    c = load_config_file(TINY + ":ppo")
    c.reward.kind, c.reward.model.source, c.value_init = "model", "random", "reward"  # a reward model of tiny's shape
    c.ppo.epochs, c.ppo.minibatches = 2, 2
    plans, info = plan_ppo(c, devices)
    assert set(plans) == {"generate", "reward_score", "rollout_stats", "ppo_update"} and info["mode"] == "ppo"
    assert all(p.fits and p.compiled.argument_bytes > 0 for p in plans.values())
    # the update's arguments are the whole state; while generating, the value model and optimizer state are held
    assert plans["generate"].resident_bytes > 0 and plans["ppo_update"].compiled.argument_bytes > \
        plans["generate"].compiled.argument_bytes
    for name, plan in plans.items():  # a missed trip count would be off by the layers, tokens or updates (2-16x)
        assert 0.8 < plan.estimated_flops / plan.model_flops < 1.25, name
        assert plan.estimated_step_seconds > 0
    assert info["estimated_iteration_seconds"] == pytest.approx(sum(p.estimated_step_seconds for p in plans.values()))


