"""Every shipped config loads (with its variants) and says how to run it; the launch scripts' dry runs."""

import glob
import os
import subprocess

import pytest

from dpo_jax.config import ConfigError, load_config_file
from dpo_jax.train.state import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
VARIANTS = {"tiny.py": ["dpo", "sft", "unlikelihood", "simpo", "reward", "best_of_n", "ppo", "online_dpo",
                        "iterative_dpo"],
            "rm_hh.py": ["model=pythia-1.4b"], "sft_hh.py": ["model=pythia-6.9b"],
            "dpo_hh.py": ["model=pythia-1.4b"], "dpo_ultrafeedback.py": ["model=llama-3-8b"],
            "sentiment.py": ["full"]}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_its_docstring_starts_with_the_command(path):
    with open(path) as f:
        text = f.read()
    assert text.startswith('"""dpo-jax '), path
    assert "Expected" in text.split('"""')[1]
    for arg in [None] + VARIANTS.get(os.path.basename(path), []):
        config = load_config_file(path if arg is None else f"{path}:{arg}")
        if "optimizer" in config:
            make_optimizer(config.optimizer)  # the schedule/optimizer settings are valid


def test_paper_recipes_are_what_the_paper_says():
    hh = load_config_file(os.path.join(REPO, "configs", "dpo_hh.py"))
    assert (hh.dpo.beta, hh.train.global_batch_pairs, hh.optimizer.name, hh.optimizer.learning_rate,
            hh.optimizer.warmup_steps, hh.optimizer.clip_grad_norm) == (0.1, 64, "rmsprop", 1e-6, 150, 10.0)
    assert load_config_file(os.path.join(REPO, "configs", "sft_hh.py")).train.mode == "sft"
    rm = load_config_file(os.path.join(REPO, "configs", "rm_hh.py"))
    assert (rm.train.mode, rm.data.layout, rm.train.eval_samples) == ("reward", "packed", 0)
    assert load_config_file(os.path.join(REPO, "configs", "dpo_tldr.py")).dpo.beta == 0.5
    with pytest.raises(ConfigError, match="bad config argument 'size=7b'"):
        load_config_file(os.path.join(REPO, "configs", "dpo_hh.py:size=7b"))


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    def dry(*args):
        out = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry-run", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "gcloud compute tpus tpu-vm create dpo-v4 --zone us-central2-b --accelerator-type v4-32" in dry(
        "create", "dpo-v4", "us-central2-b", "v4-32")
    run = dry("run", "dpo-v4", "us-central2-b", "--", "--config", "configs/dpo_hh.py", "--config.dpo.beta=0.05")
    assert "--worker=all" in run and "LIBTPU_INIT_ARGS" in run and "xla_tpu_enable_async_collective_fusion" in run
    assert "dpo-jax\\ train\\ --config\\ configs/dpo_hh.py\\ --config.dpo.beta=0.05" in run.replace("'", "") or \
        "dpo-jax train --config configs/dpo_hh.py --config.dpo.beta=0.05" in run.replace("\\", "")
    assert "pkill -TERM" in dry("stop", "dpo-v4", "us-central2-b").replace("\\", "")
    # create with the run's arguments plans it for the accelerator first (a plan that does not fit exits 1)
    created = dry("create", "dpo-v5p", "us-east5-a", "v5p-64", "--", "--config", "configs/dpo_hh.py").splitlines()
    assert created[0].replace("\\", "") == "+ dpo-jax plan --config configs/dpo_hh.py --topology v5p-64 --out " \
        "plan_dpo-v5p.json" and "tpu-vm create dpo-v5p" in created[1]
    bad = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry-run", "explode", "x", "y"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown action 'explode'" in bad.stderr


def test_slurm_dry_run_prints_the_srun_command():
    out = subprocess.run(["bash", "launch/gpu_slurm.sbatch", "--config", "configs/dpo_tldr.py"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    assert "srun --kill-on-bad-exit=1 dpo-jax train --config configs/dpo_tldr.py --config.distributed.mode=auto" \
        in out.stdout
