"""Hand the C heap's free pages back to the operating system between the passes of a fit.

A fit allocates and frees many chunk-sized NumPy arrays. glibc's allocator raises its mmap
threshold after such arrays are freed (up to 32 MB), so later chunks come from the heap,
and the pages they leave behind stay counted in the process's resident memory. Before the
large outputs are allocated, :func:`release_free_memory` returns them (``malloc_trim``):
measured on 50,000 cells x 2,000 genes, 300 MB less peak RSS. XLA's compiler leaves its
freed memory in the heap in the same way (about 450 MB resident after compiling the
per-gene fit's programs; 190 MB less peak RSS at 5,000 x 1,000 when trimmed after each
compilation). Elsewhere it does nothing.

On a multi-core CPU a fit runs chunks and blocks of cells in threads, and glibc gives every
new thread its own heap ("arena"); memory freed in those heaps is not all returned by the trim.
:func:`limit_arenas` therefore caps the process at two arenas when velofit's fitting code is
imported (:mod:`velofit.core`), before JAX starts its compiler and runtime threads
(``mallopt(M_ARENA_MAX, 2)``, what ``MALLOC_ARENA_MAX=2`` does at start-up): measured on a
per-gene fit of 100,000 cells x 2,000 genes, peak RSS 4,710-4,777 MB with glibc's default
(8 arenas per core; 16 after one small fit on 2 cores) and 4,634 MB with two, at the same
speed. The cap is process-wide and permanent (glibc fixes the limit once it is first
needed); it has no effect if the process already has more than eight arenas (e.g. JAX ran
before velofit was imported), and none off glibc.

:func:`release_free_memory` first runs the cyclic garbage collector: a JAX array that uses a
NumPy array's memory in place (:func:`velofit._host.to_device`) sits in a reference cycle
inside JAX, so its memory is returned only when the collector runs, not when the last
reference goes (measured: a 1 GB chunked copy of the data stayed resident until
``gc.collect()``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.cache
def _glibc(name: str):
    """The C library's function ``name``, or ``None`` off Linux or where it lacks it (e.g. musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_free_memory(collect: bool = True) -> bool:
    """Free unreachable objects, then return the C heap's free pages to the operating system.

    Parameters
    ----------
    collect
        Run the cyclic garbage collector first (about 0.1 s in a process that has imported
        JAX); without it, only ``malloc_trim`` runs (about 20 ms), e.g. after XLA compiled
        a program (:mod:`velofit.core.compile_cache`), whose memory is freed without cycles.

    Returns
    -------
    Whether any memory was released (always ``False`` off glibc).
    """
    if collect:
        gc.collect()
    trim = _glibc("malloc_trim")
    return bool(trim(0)) if trim is not None else False


#: ``M_ARENA_MAX`` of glibc's ``mallopt``.
_M_ARENA_MAX = -8
#: Arenas velofit allows the process (see the module docstring).
MAX_ARENAS = 2


@functools.lru_cache(maxsize=1)
def limit_arenas() -> bool:
    """Cap glibc's number of malloc arenas at :data:`MAX_ARENAS` (once per process).

    Returns
    -------
    Whether glibc accepted the setting (``False`` off glibc).
    """
    mallopt = _glibc("mallopt")
    return bool(mallopt(_M_ARENA_MAX, MAX_ARENAS)) if mallopt is not None else False
