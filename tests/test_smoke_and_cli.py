"""The built-in smoke run learns, and the CLI turns config mistakes into messages that name the key or file."""

import math
import os
import subprocess
import sys

import pytest

from dpo_jax import config as cfg
from dpo_jax.commands import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpo_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_toy_dpo_starts_at_ln2_and_learns_the_preference():
    c = smoke.default_config()
    c.steps, c.log_every = 60, 20
    result = smoke.train(c)
    assert abs(result["first_loss"] - math.log(2.0)) < 1e-6
    last = result["history"][-1]
    assert last["rewards/accuracies"] >= 0.95 and last["loss"] < 0.1
    before, after = result["preferred_mass"]
    assert after > before + 0.2
    assert result["kl"][0] == pytest.approx(0.0, abs=1e-6) and result["kl"][1] > 0.0


def test_cli_runs_with_overrides_from_a_config_file():
    out = _cli("smoke", "--config", "configs/smoke.py:ipo", "--config.steps=30", "--config.log_every=10")
    assert out.returncode == 0, out.stderr
    assert "toy DPO (ipo, beta=0.1)" in out.stdout and "smoke run OK" in out.stdout
    assert out.stdout.count("step ") == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["smoke", "--config.dpo.bta=1"], "unknown config key --config.dpo.bta; did you mean --config.dpo.beta?"),
        (["smoke", "--config", "configs/missing.py"], "config file 'configs/missing.py' does not exist"),
        (["smoke", "--config.dpo.loss_type=dpo"], "config.dpo: unknown loss_type 'dpo'; valid loss types:"),
        (["smoke", "--config.vocab_size=7"], "config.vocab_size must be an even number"),
        (["smoke", "--config"], "--config needs a value"),
    ],
)
def test_cli_config_mistakes_exit_2_with_a_clear_message(args, message):
    out = _cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_unknown_command_and_help():
    out = _cli("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr
    out = _cli("--help")
    assert out.returncode == 0 and "smoke" in out.stdout


def test_config_file_loading_and_its_errors(tmp_path):
    assert cfg.load_config_file(os.path.join(REPO, "configs/smoke.py:nca_pair")).dpo.loss_type == "nca_pair"
    no_fn = tmp_path / "no_fn.py"
    no_fn.write_text("x = 1\n")
    with pytest.raises(cfg.ConfigError, match="no_fn.py' has no get_config"):
        cfg.load_config_file(str(no_fn))
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_config():\n    return {'a': 1}\n")
    with pytest.raises(cfg.ConfigError, match="returned dict, not a ConfigDict"):
        cfg.load_config_file(str(wrong))
    with pytest.raises(cfg.ConfigError, match=r"wrong.py': TypeError: get_config\(\) takes 0 positional arguments"):
        cfg.load_config_file(f"{wrong}:variant")


def test_split_config_args():
    spec, keys, rest = cfg.split_config_args(["prog", "--config=a.py:x", "--config.b.c=1", "--other"])
    assert (spec, keys, rest) == ("a.py:x", ["b.c"], ["prog", "--config.b.c=1", "--other"])
