"""The persistent compilation cache is on by default, where the user says (or under the cache directory), off when
asked; a `dpo-jax train` run writes nothing outside its run directory and the cache directory, and a second run of
it compiles nothing new."""

import os
import subprocess
import sys

from tests.test_runs import REPO, TINY

SNIPPET = ("import sys, jax, jax.numpy as jnp; from dpo_jax import compile_cache; "
           "print('cache:', compile_cache.configure(sys.argv[1])); "
           "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).block_until_ready()")


def _env(tmp_path, **extra):
    """The suite's environment without its own cache directory (conftest.py), so the defaults apply."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "DPO_JAX_COMPILE_CACHE", "DPO_JAX_CACHE")}
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", HOME=str(tmp_path / "home"), **extra)
    return env


def _files(directory) -> set[str]:
    return {os.path.relpath(os.path.join(root, name), directory)
            for root, _, names in os.walk(directory) for name in names}


def _compile(tmp_path, cache_dir, **env) -> str:
    out = subprocess.run([sys.executable, "-c", SNIPPET, str(cache_dir)], cwd=REPO, env=_env(tmp_path, **env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("cache:")[1].strip()


def test_the_compile_cache_goes_where_the_user_says_and_switches_off(tmp_path):
    assert _compile(tmp_path, tmp_path / "config_dir") == str(tmp_path / "config_dir" / "xla")  # the command's
    assert _files(tmp_path / "config_dir" / "xla")
    assert _compile(tmp_path, "", DPO_JAX_CACHE=str(tmp_path / "env_dir")) == str(tmp_path / "env_dir" / "xla")
    assert _files(tmp_path / "env_dir" / "xla")
    named = tmp_path / "named"
    assert _compile(tmp_path, tmp_path / "unused", DPO_JAX_COMPILE_CACHE=str(named)) == str(named)
    assert _files(named) and not (tmp_path / "unused").exists()
    jax_own = tmp_path / "jax_own"  # JAX's own setting is the user's choice: kept
    assert _compile(tmp_path, tmp_path / "unused", JAX_COMPILATION_CACHE_DIR=str(jax_own)) == str(jax_own)
    assert _files(jax_own) and not (tmp_path / "unused").exists()
    for off in ("off", "0"):
        assert _compile(tmp_path, tmp_path / "unused", DPO_JAX_COMPILE_CACHE=off,
                        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_off")) == "None"
        assert not (tmp_path / "unused").exists() and not (tmp_path / "jax_off").exists()
    assert not (tmp_path / "home").exists()


def test_a_train_run_writes_only_its_run_and_cache_directories_and_compiles_once(tmp_path):
    """HOME, TMPDIR and the working directory are sandboxed: after two runs (the second warm) the only files are
    under the cache directory and the two run directories, and the second added no compiled program."""
    work, cache, temp = tmp_path / "work", tmp_path / "cache", tmp_path / "tmp"
    for d in (work, temp):
        d.mkdir()
    env = _env(tmp_path, DPO_JAX_CACHE=str(cache), TMPDIR=str(temp))
    compiled = []
    for run in ("first", "second"):
        cli = [sys.executable, "-m", "dpo_jax.main", "train", "--config", f"{TINY}:dpo",
               f"--config.train.run_dir=runs/{run}", "--config.train.steps=4", "--config.train.save_every=4",
               "--config.train.log_every=2", "--config.train.eval_samples=0", "--config.train.tensorboard=False"]
        out = subprocess.run(cli, cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "requested 16 pairs a step, realized" in out.stdout  # the derived token budget, logged
        compiled.append(_files(cache / "xla"))
    assert compiled[0] and compiled[1] == compiled[0]
    outside = {f for f in _files(tmp_path) if not f.startswith(("cache/", "work/runs/first/", "work/runs/second/"))}
    assert not outside, sorted(outside)
