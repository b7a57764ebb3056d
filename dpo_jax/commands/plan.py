"""`dpo-jax plan`: a run compiled for a TPU topology before paying for it — memory against HBM, fits or not, the
compiler's step-time estimate, collectives; `--fit` finds the fastest remat / micro-batch / tensor-parallel
settings that fit.

    pip install -e ".[tpu]"   # libtpu: the TPU compiler, no TPU needed
    dpo-jax plan --config configs/dpo_hh.py --config.model.preset=llama3-8b --topology v5e:4x4 [--num_slices 2]
        [--fit] [--out plan.json]

Takes any `train` config (the same overrides), or a `ppo` config (generation, scoring, the reference/value pass
and the update, each estimated per PPO iteration, and their sum). Nothing is read but the config (and an HF
config.json, or the tokenizer of a random-init model), nothing runs, nothing is allocated. Times, tokens/s and MFU
(marked *) are estimates from the TPU compiler's cost analysis, not measurements.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
from absl import flags

from dpo_jax.commands.train import default_config  # noqa: F401 — plan takes train's config schema
from dpo_jax.plan.chips import GIB, chip_of, topology_devices
from dpo_jax.plan.fit import fit as search
from dpo_jax.plan.ppo_plan import is_ppo_config, plan_ppo
from dpo_jax.plan.estimate import plan_programs

FLAG_NAMES = ("topology", "num_slices", "fit", "out")


def define_flags() -> None:
    """The plan's own flags beside --config (main.py calls this before parsing)."""
    if "topology" in flags.FLAGS:
        return
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:4x4, v5p:4x4x4, v6e:2x4")
    flags.DEFINE_integer("num_slices", 1, "slices (multi-slice over DCN: set config.mesh.dcn_* too)")
    flags.DEFINE_bool("fit", False, "search remat policy, micro-batches and the tensor-parallel size for the "
                      "fastest plan that fits")
    flags.DEFINE_string("out", "", "write the plan as JSON here")


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def report(plan: dict) -> str:
    """The plan as a table (what `dpo-jax plan` prints)."""
    info, model = plan["run"], plan["run"]["model"]
    batch = info["batch"]
    lines = [
        f"plan: {plan['model_name']} ({model['family']}, {model['layers']} layers, {model['parameters'] / 1e9:.2f} B "
        f"parameters{', LoRA rank ' + str(model['lora_rank']) if model['lora_rank'] else ''}), mode {info['mode']}, "
        f"{info['layout']} rows {batch['rows']} x {batch['seq_len']} tokens, micro-batches {info['micro_batches']}, "
        f"remat {model['remat_policy']}, compute {model['dtype']}, params {model['param_dtype']}",
        f"topology {plan['topology']} x {plan['num_slices']} slice(s): {info['devices']} x {info['chip']} "
        f"({_gib(info['hbm_bytes'])} GiB HBM, {info['peak_tflops_per_device']:.0f} bf16 TFLOP/s each), mesh "
        + " ".join(f"{k}={v}" for k, v in info["mesh"].items()),
        "",
        f"{'program':<15}{'fits':<6}{'GiB per device: args':>21}{'out':>7}{'temp':>7}{'peak':>7}{'+other':>8}"
        f"{'step s*':>10}{'ICI s*':>8}{'tokens/s*':>12}{'MFU*':>7}{'PFLOP ours/compiler*':>22}{'compile s':>11}",
    ]
    for name, p in plan["programs"].items():
        fits = "yes" if p["fits"] else "NO"
        if p["estimated_step_seconds"]:
            estimate = (f"{p['estimated_step_seconds']:>10.3f}{p.get('estimated_collective_seconds', 0.0):>8.3f}"
                        f"{p['tokens_per_second']:>12,.0f}"
                        f"{100 * p['estimated_mfu']:>6.1f}%{p['model_flops'] / 1e15:>13.2f} / "
                        f"{p['estimated_flops'] / 1e15:<6.2f}")
        else:  # no estimate (a plan that does not fit)
            estimate = f"{'-':>10}{'-':>8}{'-':>12}{'-':>7}{p['model_flops'] / 1e15:>13.2f} / {'-':<6}"
        lines.append(
            f"{name:<15}{fits:<6}{_gib(p['argument_bytes']):>21}{_gib(p['output_bytes']):>7}"
            f"{_gib(p['temp_bytes']):>7}{_gib(p['peak_bytes']):>7}{_gib(p['resident_bytes']):>8}"
            f"{estimate}{p['compile_seconds']:>11.1f}")
        if p["error"]:
            lines.append(f"  does not fit: {p['error']}")
    lines.append("")
    for name, p in plan["programs"].items():
        parts = [f"{kind} {v['count']} ({_gib(v['bytes'])} GiB)" for kind, v in sorted(p["collectives"].items())]
        lines.append(f"collectives in {name} (a loop body's once): {', '.join(parts) or 'none'}")
    lines.append("* estimates, not measurements: the roofline (bf16 peak, HBM bandwidth, ICI bandwidth) of the TPU "
                 "compiler's FLOPs, bytes and collective bytes, loop bodies scaled by their trip counts; ICI s: the "
                 "collective term alone (within a slice); +other: what else the run holds meanwhile "
                 "(optimizer state, a resident reference)")
    if plan.get("fit"):
        fit = plan["fit"]
        lines.append("--fit: " + (" ".join(fit["overrides"]) if fit["overrides"] else
                                  "nothing tried fits; use more chips, LoRA or a shorter max_length"))
        for tried in fit["tried"]:
            settings = ", ".join(f"{k} {tried[k]}" for k in ("tensor", "remat_policy", "micro_batches") if k in tried)
            outcome = tried.get("error") or (f"{tried['total_bytes'] / GIB:.1f} GiB, "
                                             + ("fits" if tried["fits"] else "does not fit"))
            lines.append(f"  tried {settings}: {outcome}")
    if info.get("estimated_iteration_seconds"):
        lines.append(f"PPO iteration*: {info['estimated_iteration_seconds']:.3f} s (generation decodes every "
                     "max_new_tokens: an upper bound)")
    lines.append("fits: " + ("yes" if plan["fits"] else "NO"))
    return "\n".join(lines)


def make_plan(c: ml_collections.ConfigDict, topology: str, num_slices: int = 1, fit: bool = False) -> dict:
    """The plan of a train config (or of a `dpo-jax ppo` config: its four programs) as JSON-ready."""
    devices = topology_devices(topology, num_slices)
    found = None
    if is_ppo_config(c):
        if fit:
            raise ValueError("--fit searches a train run's remat and micro-batches; for a PPO config, plan without it "
                             "and set config.policy.remat_policy / config.ppo.minibatches by hand")
        plans, info = plan_ppo(c, devices)
        model = c.policy
    else:
        chosen = None
        if fit:
            found, chosen = search(c, devices)  # the chosen candidate's plans: compiled and estimated already
        plans, info = chosen or plan_programs(c, devices)
        model = c.model
    programs = {name: p.to_json(info["devices"], chip_of(devices[0])) for name, p in plans.items()}
    return {"topology": topology, "num_slices": num_slices,
            "model_name": model.get("preset") or model.path or model.family, "run": info, "programs": programs,
            "fits": all(p["fits"] for p in programs.values()), "fit": found}


def main(c: ml_collections.ConfigDict) -> None:
    if not flags.FLAGS.topology:
        raise ValueError("--topology is required (e.g. --topology v5e:4x4)")
    plan = make_plan(c, flags.FLAGS.topology, flags.FLAGS.num_slices, flags.FLAGS.fit)
    print(report(plan), flush=True)
    if flags.FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.out)), exist_ok=True)
        with open(flags.FLAGS.out, "w") as f:
            json.dump(plan, f, indent=2)
        print(f"wrote {flags.FLAGS.out}", flush=True)
    if not plan["fits"]:
        sys.exit(1)
