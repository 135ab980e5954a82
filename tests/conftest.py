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
# it with the CLI subprocesses through the environment). The library itself never does this.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _float64():
    """Run the test with 64-bit JAX arrays, scoped to the test."""
    with jax.enable_x64(True):
        yield
