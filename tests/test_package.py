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
