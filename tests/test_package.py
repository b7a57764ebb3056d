"""Packaging rules that are easy to break without noticing."""

import os
import re
import pkgutil
import subprocess
import sys

import dpo_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runtime_modules_import_without_torch():
    """torch is a test-only dependency: every runtime module must import with torch made unimportable."""
    names = [m.name for m in pkgutil.walk_packages(dpo_jax.__path__, "dpo_jax.")]
    assert "dpo_jax.losses" in names and "dpo_jax.logprobs" in names
    code = "import sys, importlib\nsys.modules['torch'] = None\n" + "".join(
        f"importlib.import_module({n!r})\n" for n in names
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_torch_requirement_is_pinned():
    """An unpinned torch pulls a multi-GB CUDA build; every requirement string naming torch must pin 2.13.0."""
    with open(os.path.join(REPO, "setup.py")) as f:
        requirements = re.findall(r'"(torch[^"]*)"', f.read())
    assert requirements == ["torch==2.13.0"]


def test_ci_runs_the_readme_test_command():
    """README has exactly two set-up commands; .ci/run must run the second one verbatim."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2, commands
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f]
    assert commands[1].strip() in ci_lines


def test_one_training_loop_and_no_oversized_module():
    """Trainer.fit is the only loop in the package that steps an optimizer (the step functions it calls update it:
    the preference step, and PPO's iteration over its minibatches); no module grows past ~400 lines."""
    calls, sizes = [], {}
    for root, _, files in os.walk(os.path.join(REPO, "dpo_jax")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    lines = f.readlines()
                sizes[os.path.relpath(path, REPO)] = len(lines)
                calls += [os.path.relpath(path, REPO) for line in lines
                          if re.search(r"\.train_step\(|optimizer\.update\(|opt\.update\(", line)]
    assert sorted(calls) == ["dpo_jax/rlhf/ppo.py", "dpo_jax/train/step.py", "dpo_jax/train/trainer.py"], calls
    assert max(sizes.values()) <= 410, {k: v for k, v in sizes.items() if v > 410}
