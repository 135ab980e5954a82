"""Compiled executables of the jitted kernels: memoised in this process, cached on disk across processes.

XLA compiles velofit's EM in several seconds, which is most of a small fit. Every executable
is therefore compiled once per shape in a process (memoised) and, unless disabled, written to
a cache folder so that the next process on this machine loads it instead of compiling
(``jax.experimental.serialize_executable``; loading takes well under a second).

The disk key is a SHA-256 of everything the program is made from: the source of every
velofit module, the function's name, the shapes and dtypes of its arguments and its static
arguments, JAX's and jaxlib's versions and configuration, the platform and device kind and
``XLA_FLAGS``. Any change of velofit's code, JAX, or the machine's accelerator gives a new
key, never a stale executable; and a hit needs no tracing (tracing and lowering the EM take
several seconds of their own). The folder is

- ``$VELOFIT_CACHE_DIR`` when set (``off``, ``0``, ``false`` or an empty value disable the
  disk cache), else
- ``$XDG_CACHE_HOME/velofit/xla``, else ``~/.cache/velofit/xla``.

When JAX's own persistent compilation cache is switched on (``jax_compilation_cache_dir``),
velofit leaves cross-process caching to it and only memoises: an executable JAX loaded from
its cache does not serialise into a runnable file again (measured: "Function ... not found"
when the reloaded program runs).

Files are written atomically (a temporary file renamed into place), so concurrent processes
never read a partial file; an unreadable or corrupt file is recompiled and replaced; a
folder that cannot be written only costs the saving. The folder is pruned to
:data:`MAX_CACHE_BYTES`, oldest files first (never the one just written). As with JAX's own compilation cache, only point
``VELOFIT_CACHE_DIR`` at a folder you trust: loading an executable runs its code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pickle
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from .._heap import release_free_memory

#: Environment variable naming the cache folder (or disabling it).
CACHE_ENV = "VELOFIT_CACHE_DIR"
#: The disk cache is pruned to this many bytes, oldest files first.
MAX_CACHE_BYTES = 512 * 1024**2
_DISABLED = ("", "0", "off", "false", "no", "none")
_SUFFIX = ".xla"

_memo: dict[tuple, Any] = {}
_lock = threading.Lock()


def cache_dir() -> Path | None:
    """The folder of the disk cache, or ``None`` when it is disabled.

    Returns
    -------
    Path of the folder (it may not exist yet), or ``None``.
    """
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _DISABLED else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "velofit" / "xla"


def compiled(jitted: Callable, args: tuple, *, static: dict[str, Any], device: jax.Device) -> Any:
    """The compiled executable of ``jitted`` for the shapes and dtypes of ``args`` on ``device``.

    Parameters
    ----------
    jitted
        A ``jax.jit``-wrapped function whose static arguments are passed by keyword.
    args
        Example positional arguments (arrays or ``jax.ShapeDtypeStruct``; only shapes and
        dtypes are used). Float64 is enabled while tracing.
    static
        The static keyword arguments (hashable).
    device
        Device to compile for.

    Returns
    -------
    A ``jax.stages.Compiled``, called with the dynamic arguments only: ``f(*args)``.
    """
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    leaves, tree = jax.tree.flatten(specs)
    signature = (tree, tuple((x.shape, str(x.dtype)) for x in leaves), tuple(sorted(static.items())))
    memo_key = (jitted, *signature, device)
    with _lock:
        executable = _memo.get(memo_key)
        if executable is None:
            with jax.enable_x64(True), jax.default_device(device):
                executable = _load_or_compile(jitted, specs, static, signature, device)
            _memo[memo_key] = executable
    return executable


def _jax_cache_on() -> bool:
    return bool(jax.config.jax_compilation_cache_dir) and bool(jax.config.jax_enable_compilation_cache)


def _load_or_compile(jitted: Callable, specs: tuple, static: dict, signature: tuple, device: jax.Device) -> Any:
    folder = cache_dir()
    if folder is None or _jax_cache_on():
        return _compile(jitted, specs, static)
    path = folder / f"{_disk_key(jitted, signature, device)}{_SUFFIX}"
    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        return _deserialize(payload, in_tree, out_tree, device)
    except Exception:  # noqa: BLE001, S110 - missing, truncated, corrupt or foreign: compile, replace
        pass
    executable = _compile(jitted, specs, static)
    _store(folder, path, executable)
    return executable


def _compile(jitted: Callable, specs: tuple, static: dict) -> Any:
    """Trace, lower and compile; then return the compiler's freed memory to the system.

    (Without the trim, the memory XLA's compiler used stays resident for the rest of the
    process: :mod:`velofit._heap`.)
    """
    executable = jitted.lower(*specs, **static).compile()
    release_free_memory(collect=False)
    return executable


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """SHA-256 of every velofit module's source (the programs are made from them)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _disk_key(jitted: Callable, signature: tuple, device: jax.Device) -> str:
    function = getattr(jitted, "__wrapped__", jitted)
    config = sorted((k, repr(v)) for k, v in jax.config.values.items() if "cache" not in k and "log" not in k)
    digest = hashlib.sha256()
    for part in (
        _source_digest(),
        f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(function))}",
        repr(signature),
        jax.__version__,
        _jaxlib_version(),
        repr(config),
        getattr(device.client, "platform_version", ""),
        device.platform,
        getattr(device, "device_kind", ""),
        os.environ.get("XLA_FLAGS", ""),
    ):
        digest.update(str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@functools.cache
def _prepare_runtime(platform: str) -> None:
    """Set up what a loaded program calls but only lowering sets up.

    JAX initialises its LAPACK kernels (the M-step's linear solve) when it lowers a program
    that uses them; a program loaded from disk in a process that lowered none calls them
    uninitialised and crashes (measured: a segmentation fault). Lowering one tiny solve
    initialises them for every later program.
    """
    spec = jax.ShapeDtypeStruct((2, 2), jax.numpy.float64)
    with jax.enable_x64(True):
        jax.jit(jax.numpy.linalg.solve).lower(spec, spec)


def _deserialize(payload: bytes, in_tree: Any, out_tree: Any, device: jax.Device) -> Any:
    from jax.experimental.serialize_executable import deserialize_and_load

    _prepare_runtime(device.platform)
    return deserialize_and_load(payload, in_tree, out_tree, backend=device.client, execution_devices=[device])


def _store(folder: Path, path: Path, executable: Any) -> None:
    from jax.experimental.serialize_executable import serialize

    try:
        blob = pickle.dumps(serialize(executable), protocol=pickle.HIGHEST_PROTOCOL)
    except (ValueError, NotImplementedError, TypeError, pickle.PicklingError):
        return  # this executable cannot be serialised: it is only memoised
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _prune(folder, keep=path)
    except OSError as err:
        warnings.warn(
            f"velofit could not write its compilation cache in {folder} ({err}); set {CACHE_ENV} to a "
            f"writable folder, or to 'off'",
            RuntimeWarning,
            stacklevel=4,
        )


def _prune(folder: Path, keep: Path) -> None:
    """Delete the oldest files until the folder holds at most MAX_CACHE_BYTES (never ``keep``)."""
    files = []
    for entry in folder.glob(f"*{_SUFFIX}"):
        try:
            stat = entry.stat()
        except OSError:
            continue
        files.append((stat.st_mtime, stat.st_size, entry))
    total = sum(size for _, size, _ in files)
    for _, size, entry in sorted(files):
        if total <= MAX_CACHE_BYTES:
            break
        if entry == keep:
            continue
        try:
            entry.unlink()
            total -= size
        except OSError:
            pass


def clear_memo() -> None:
    """Forget the executables compiled in this process (the disk cache is kept)."""
    with _lock:
        _memo.clear()
