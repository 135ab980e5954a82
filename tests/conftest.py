"""Shared test configuration.

Every test runs inside ``jax.enable_x64(True)`` (scoped: the global JAX configuration is
never changed), so JAX arrays are float64 as the package's contract requires.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

# The suite is our own process: keep compiled code on disk between tests and runs (and share
# it with the CLI subprocesses through the environment). JAX's own cache serves the kernels
# the tests jit themselves; velofit's cache (velofit.core.compile_cache) is kept in the
# project's .pytest_cache rather than the user's home.
_CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache"
os.environ.setdefault("VELOFIT_CACHE_DIR", str(_CACHE / "velofit-xla"))
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE / "jax")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _float64():
    """Run the test with 64-bit JAX arrays, scoped to the test."""
    with jax.enable_x64(True):
        yield
