"""Test set-up: 8 fake CPU devices, so meshes of 1-8 devices are real, and one persistent compilation cache for the
whole session. Must run before jax is imported.

The cache: many tests compile the same small programs again — a run and its SIGKILL-resumed twin, the CLI runs in
subprocesses, every fixture that rebuilds an engine — so each compiled executable is kept in a temporary directory
(removed at exit) that this process and every subprocess it starts share (they inherit the environment). On
tests/test_runs.py alone it cuts 318 s to 209 s. It caches only the compiler's output, never a result.

The README runs the suite on two pytest-xdist workers, a file per worker (`-n 2 --dist loadfile`: a module's fixtures,
such as the sentiment experiment's, are built once). Compiling is mostly one thread, so a second worker keeps the
second core busy: 2,166 s → 1,764-1,967 s on this suite, 1,732 s with level 0 below (docs/PERFORMANCE.md, "The
test suite's time").

Compile what a test computes, never run a model or a loss op by op: outside jit each call compiles every primitive
for its shapes (a tiny decoder's forward: hundreds of compiles, ~4 s per new input shape against ~1 s to compile
it whole). The plain path is jitted — `engine_helpers.loss_and_grads` and `plain_pair_logprobs`, or a `jax.jit` in
the test — and subprocesses keep the suite's flags (`xla_flags_with_devices`). That rule took the suite from
1,713 s to 1,043 s.
"""

import atexit
import os
import shutil
import tempfile

import pytest

# XLA's CPU backend at optimization level 0: most tests compile small programs and run them for a few steps, and
# compiling is most of their time (tests/test_engine.py and test_packed.py: 424 s → 328 s). The one test module that
# mostly runs, the sentiment experiment's, runs it in a subprocess at the default level (π_SFT: 42 s there, 76 s here).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                    FAST_COMPILE]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dpo_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Through the environment, not jax.config: the CLI subprocesses then compile the very programs this process does (the
# precision is part of the program), so they can load this process's from the shared cache.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"


def xla_flags_with_devices(count: int) -> str:
    """The suite's XLA flags (its optimization level above) with another fake device count: a subprocess's."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


def pytest_configure(config):
    """The slowest tests are listed at the end of every run (CI's log too), so the suite's time can be watched."""
    if config.option.durations is None:  # --durations=0 (every test) is kept
        config.option.durations = 25


# The rule above, watched: each test's in-process XLA compiles (setup and call) are counted and the largest counts
# listed at the end of every run, beside the slowest durations. A test near the top runs something op by op.
_compiles = [0]
_listening = [False]


def _count_compile(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles[0] += 1


def _counted(item):
    if not _listening[0]:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_count_compile)
        _listening[0] = True
    before = _compiles[0]
    yield
    item.user_properties.append(("xla_compiles", _compiles[0] - before))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _counted(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _counted(item)


def pytest_terminal_summary(terminalreporter):
    counts = sorted(((sum(v for k, v in report.user_properties if k == "xla_compiles"), report.nodeid)
                     for category in ("passed", "failed") for report in terminalreporter.stats.get(category, [])
                     if report.when == "call"), reverse=True)
    if counts:
        terminalreporter.write_sep("=", "most XLA compiles per test (in-process, setup + call: tests/conftest.py)")
        for count, nodeid in counts[:10]:
            terminalreporter.write_line(f"{count:6d}  {nodeid}")
