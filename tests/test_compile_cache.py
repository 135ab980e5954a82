"""The compiled-executable cache (velofit.core.compile_cache): memoised, on disk, and safe.

The test suite switches JAX's own persistent compilation cache on (conftest), and velofit
then leaves cross-process caching to JAX. The disk cache is therefore exercised in fresh
Python processes started without JAX's cache, as a user's process runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from velofit.core import compile_cache

PRELUDE = """
import sys, warnings
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from velofit.core import compile_cache

@jax.jit
def kernel(x, y):
    return jnp.exp(-x) * y + jnp.sum(x, axis=0)

ARGS = (np.linspace(0.0, 2.0, 12).reshape(4, 3), np.ones((4, 3)))
CPU = jax.devices("cpu")[0]

def run(args=ARGS):
    return np.asarray(compile_cache.compiled(kernel, args, static={}, device=CPU)(*args))

def refuse(self, *a, **k):
    raise AssertionError("compiled although the disk cache holds the executable")
"""


def in_fresh_process(body: str, cache_dir) -> str:
    """Run ``body`` in a new Python process without JAX's persistent cache; return stdout."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env[compile_cache.CACHE_ENV] = str(cache_dir)
    code = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_later_process_loads_instead_of_compiling(tmp_path):
    cache = tmp_path / "xla"
    in_fresh_process("run()", cache)
    assert len(list(cache.glob("*.xla"))) == 1
    out = in_fresh_process(
        """
        jax.stages.Lowered.compile = refuse
        x = run()
        np.testing.assert_array_equal(x, np.asarray(kernel(*ARGS)))
        print("loaded")
        """,
        cache,
    )
    assert out.strip() == "loaded"


def test_heap_trimmed_after_compiling_not_after_loading(tmp_path):
    """XLA's freed compiler memory is handed back (malloc_trim) after a compilation only."""
    cache = tmp_path / "xla"
    count = """
        calls = []
        compile_cache.release_free_memory = lambda collect=True: calls.append(collect)
        run()
        print(calls)
        """
    assert in_fresh_process(count, cache).strip() == "[False]"  # compiled: trimmed, no gc pass
    assert in_fresh_process(count, cache).strip() == "[]"  # loaded from disk: nothing to trim


def test_corrupt_file_is_recompiled_and_replaced(tmp_path):
    cache = tmp_path / "xla"
    in_fresh_process("run()", cache)
    (path,) = cache.glob("*.xla")
    path.write_bytes(b"not an executable")
    in_fresh_process("np.testing.assert_array_equal(run(), np.asarray(kernel(*ARGS)))", cache)
    assert path.read_bytes() != b"not an executable"
    in_fresh_process("jax.stages.Lowered.compile = refuse; run()", cache)


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_disabled_writes_nothing(tmp_path, value):
    out = in_fresh_process(
        f"""
        import os
        os.chdir({str(tmp_path)!r})
        assert compile_cache.cache_dir() is None
        np.testing.assert_array_equal(run(), np.asarray(kernel(*ARGS)))
        print("ran")
        """,
        value,
    )
    assert out.strip() == "ran"
    assert not list(tmp_path.rglob("*.xla"))


def test_unwritable_folder_warns_and_still_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    out = in_fresh_process(
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            np.testing.assert_array_equal(run(), np.asarray(kernel(*ARGS)))
        print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
        """,
        blocker / "xla",
    )
    assert "could not write its compilation cache" in out


def test_pruned_to_the_size_limit(tmp_path):
    cache = tmp_path / "xla"
    in_fresh_process("run(); compile_cache.MAX_CACHE_BYTES = 1; run((np.ones((2, 5)), np.ones((2, 5))))", cache)
    assert len(list(cache.glob("*.xla"))) == 1


def test_fit_is_the_same_with_executables_loaded_from_disk(tmp_path):
    """A fit in a process that loads every program off disk equals one compiled in place, bitwise."""
    body = """
    from velofit.core.fit import fit_genes
    from velofit.core.hard_em import EMConfig
    rng = np.random.default_rng(3)
    t = rng.uniform(0, 1, (200, 1))
    mu = rng.poisson(6 * t * np.exp(-t) * np.ones((1, 4)) + 0.5).astype(float)
    ms = rng.poisson(8 * t * t * np.ones((1, 4)) + 0.5).astype(float)
    if LOAD:
        jax.stages.Lowered.compile = refuse
    fit = fit_genes(mu, ms, EMConfig(max_iter=4))
    np.savez(OUT, **{k: getattr(fit, k) for k in ("alpha", "beta", "gamma", "t_", "scaling", "loss", "t", "trace")})
    """
    cache = tmp_path / "xla"
    for load, name in ((False, "compiled"), (True, "loaded")):
        in_fresh_process(f"LOAD = {load}; OUT = {str(tmp_path / name)!r}\n" + textwrap.dedent(body), cache)
    compiled, loaded = np.load(tmp_path / "compiled.npz"), np.load(tmp_path / "loaded.npz")
    for key in compiled.files:
        np.testing.assert_array_equal(loaded[key], compiled[key], err_msg=key)


def test_defers_to_jax_persistent_cache_when_it_is_on(tmp_path, monkeypatch):
    """In this suite JAX's own cache is on: velofit memoises but writes no file of its own."""
    assert jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path / "xla"))
    compile_cache.clear_memo()

    @jax.jit
    def kernel(x):
        return jnp.cos(x) + 1.0

    x = np.arange(5.0)
    f = compile_cache.compiled(kernel, (x,), static={}, device=jax.devices("cpu")[0])
    assert compile_cache.compiled(kernel, (x,), static={}, device=jax.devices("cpu")[0]) is f
    np.testing.assert_array_equal(np.asarray(f(x)), np.cos(x) + 1.0)
    assert not (tmp_path / "xla").exists()
    compile_cache.clear_memo()


def test_default_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == tmp_path / "velofit" / "xla"


def test_cli_uses_the_librarys_cache(monkeypatch):
    """The CLI reads and writes velofit's own disk cache, not JAX's, so that a CLI run (the
    README's ``velofit demo``) fills the cache every later fit reads, in Python too;
    ``--no-compile-cache`` switches it off for the CLI's process."""
    from pathlib import Path

    from velofit.cli._common import configure_compile_cache

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compile_cache.CACHE_ENV, "/some/folder")
    configure_compile_cache(False)
    assert compile_cache.cache_dir() == Path("/some/folder")
    assert jax.config.jax_compilation_cache_dir == before  # JAX's own cache is left as it was
    configure_compile_cache(True)
    assert compile_cache.cache_dir() is None
