"""Host arrays that JAX uses in place instead of copying.

On a CPU, ``jax.device_put(array, may_alias=True)`` keeps a NumPy array's memory (JAX holds a
reference and never writes to it) when the array is C-contiguous and its data start on a
64-byte boundary; otherwise it copies, and while copying holds up to two more copies of the
array (measured: a 1 GB float32 array briefly took 3 GB of resident memory). NumPy only
guarantees 16-byte alignment, so the large arrays built for JAX are allocated by
:func:`aligned_empty`. Such a JAX array sits in a reference cycle inside JAX: its memory is
returned when the cyclic garbage collector runs (:func:`velofit._heap.release_free_memory`
runs it where velofit drops one).
"""

from __future__ import annotations

import jax
import numpy as np

#: Alignment, in bytes, that lets JAX's CPU client use host memory in place.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data start on an :data:`ALIGNMENT`-byte boundary.

    Parameters
    ----------
    shape
        Shape of the array.
    dtype
        Its dtype.

    Returns
    -------
    The array (a view of a slightly larger byte buffer, which it keeps alive).
    """
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n_bytes + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset : offset + n_bytes].view(dtype).reshape(shape)


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """:func:`aligned_empty` filled with zeros.

    Parameters
    ----------
    shape
        Shape of the array.
    dtype
        Its dtype.

    Returns
    -------
    The array.
    """
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


def to_device(array) -> jax.Array:
    """``array`` as a JAX array on the default device, sharing its memory where JAX can.

    The caller must not write to ``array`` afterwards (the JAX array may be a view of it).

    Parameters
    ----------
    array
        A NumPy array (in place on a CPU if built by :func:`aligned_empty`) or a JAX array
        (returned as it is).

    Returns
    -------
    The JAX array.
    """
    return jax.device_put(array, may_alias=True)
