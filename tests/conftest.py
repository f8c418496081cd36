"""Test setup: 8 forced CPU devices (multi-device tests), float32 matmuls at full precision, and
one persistent compilation cache shared by both xdist workers and every subprocess the tests
start (they inherit the environment): the suite compiles the same tiny train step in dozens of
fresh onn-train processes, and a cached executable is the same program, so results are unchanged.
XLA's CPU backend skips LLVM's optimisation passes (tests/cpu_flags.py says why)."""
import os
from pathlib import Path

from cpu_flags import cpu_xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", cpu_xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# A size limit turns on jax's file lock, so the workers never read an entry being written.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402  (after the environment on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

import file_order  # noqa: E402


def pytest_configure(config):
    """Longest files first under `--dist loadfile` (tests/file_order.py says why); xdist's own
    reordering by test count is turned off so that this order is the queue's."""
    if getattr(config.option, "dist", None) == "loadfile" and hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) records
        config.pluginmanager.register(file_order.Recorder(config), "onn-file-seconds")


def pytest_collection_modifyitems(config, items):
    file_order.longest_files_first(config, items)
