"""`dpo-jax convert`: HF -> dpo_jax checkpoint -> HF, end to end through the command line."""

import os
import subprocess
import sys

import numpy as np
import transformers as T

from tests import hf_models as H

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "dpo_jax.main", "convert", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_round_trip_through_the_cli_keeps_logits_and_side_files(tmp_path):
    model = H.build("gptj")
    model.save_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = _convert("--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "ckpt"), "--scan-layers")
    assert out.returncode == 0, out.stderr
    assert "gptj" in out.stdout and os.path.isfile(tmp_path / "ckpt" / "model_config.json")
    out = _convert("--from", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "back"), "--max-shard-size", "50KB")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "back" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    ids = np.random.default_rng(0).integers(0, H.VOCAB, (2, 10))
    mask = np.ones_like(ids)
    reloaded = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), attn_implementation="eager")
    assert reloaded.config.eos_token_id == model.config.eos_token_id
    np.testing.assert_allclose(H.hf_logits(reloaded, ids, mask), H.hf_logits(model, ids, mask), atol=1e-5)


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    out = _convert("--from-hf", str(tmp_path), "--to", str(tmp_path / "x"))
    assert out.returncode == 2 and "no config.json" in out.stderr and "Traceback" not in out.stderr
    out = _convert("--from", str(tmp_path), "--to-hf", str(tmp_path / "y"))
    assert out.returncode == 2 and "not a dpo_jax model checkpoint" in out.stderr
    out = _convert("--from-hf", str(tmp_path))
    assert out.returncode == 2 and "--from-hf needs --to CKPT" in out.stderr
    out = _convert("--from", str(tmp_path), "--to-hf", str(tmp_path / "z"), "--max-shard-size", "lots")
    assert out.returncode == 2 and "invalid size 'lots'" in out.stderr
