"""Where the chunks of a fit run: this process or the user's ``dask.distributed`` cluster; which device.

A fit is a list of independent chunks of genes. :func:`map_chunks` reads each chunk's input
with ``read(cols)`` (in this process, one chunk at a time plus those in flight), runs
``task(*inputs)`` and hands every result to ``store(cols, result)`` as it arrives:

- ``backend="local"``: here, ``workers`` chunks at a time in threads (one by default). XLA
  spreads one program over the cores only in part (2 cores: 1.2-1.4x one core), so on a
  CPU the EM pass runs two chunks at once (:data:`LOCAL_CPU_WORKERS`);
- ``backend="dask"``: every chunk is submitted to an existing ``distributed.Client`` (the
  user's own cluster, or the default client); at most :func:`max_in_flight` chunks are
  submitted at a time, so the data waiting on this process and on the cluster stays bounded.
  velofit starts no scheduler, process pool or socket of its own.

The result of a chunk depends only on its input (the seeded cell subset is drawn before),
so both backends give bitwise the same fit when the workers run the same JAX on the same
kind of CPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from .._validation import VelofitInputError, VelofitTypeError

BACKENDS = ("local", "dask")
#: Chunks the EM pass of a local fit on a multi-core CPU runs at once (2 cores, 5,000 x 1,000:
#: about 7% faster than one at a time). Only the EM pass: its arrays are small (at most
#: 1,024 cells). Running the passes over all cells in threads too was 15-20% faster, but
#: glibc's per-thread heaps kept 130-160 MB of their chunk arrays resident after the fit
#: (100,000 x 2,000: peak 4,807 MB against 4,642 MB, over 3x the input).
LOCAL_CPU_WORKERS = 2
DEVICES = ("auto", "cpu", "gpu")


def check_backend(backend: object, client: object) -> str:
    """Check the ``backend`` and ``client`` arguments (the client itself is checked on use).

    Parameters
    ----------
    backend
        ``"local"`` or ``"dask"``.
    client
        ``None``, or a ``distributed.Client`` with ``backend="dask"``.

    Returns
    -------
    ``backend``.
    """
    if not isinstance(backend, str):
        raise VelofitTypeError(f"backend must be a string, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise VelofitInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if client is not None and backend != "dask":
        raise VelofitInputError("client= is only used with backend='dask'; pass backend='dask' or drop client")
    return backend


def check_device(device: object) -> str:
    """Check the ``device`` argument (its availability is checked by :func:`resolve_device`).

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"`` or ``"gpu"``.

    Returns
    -------
    ``device``.
    """
    if not isinstance(device, str):
        raise VelofitTypeError(f"device must be a string, one of {DEVICES}, got {type(device).__name__}")
    if device not in DEVICES:
        raise VelofitInputError(f"device must be one of {DEVICES}, got {device!r}")
    return device


def resolve_device(device: str) -> jax.Device:
    """The JAX device for ``"auto"``, ``"cpu"`` or ``"gpu"``.

    Parameters
    ----------
    device
        ``"auto"`` (the first GPU JAX sees, else the CPU), ``"cpu"`` or ``"gpu"``.

    Returns
    -------
    A :class:`jax.Device`.
    """
    check_device(device)
    if device in ("auto", "gpu"):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if gpus:
            return gpus[0]
        if device == "gpu":
            seen = sorted({d.platform for d in jax.devices()})
            raise VelofitInputError(
                f"device='gpu' but JAX sees no GPU (devices: {', '.join(seen)}); install a CUDA build of JAX "
                "(pip install 'jax[cuda12]') or pass device='cpu' or device='auto'"
            )
    return jax.devices("cpu")[0]


def get_client(client: Any = None) -> Any:
    """The ``distributed.Client`` to submit to: ``client``, else the default one.

    Parameters
    ----------
    client
        A ``distributed.Client`` or ``None``.

    Returns
    -------
    The client.
    """
    try:
        import distributed
    except ImportError as err:
        raise ImportError(
            "backend='dask' needs dask.distributed: pip install 'velofit[dask]' (or dask and distributed)"
        ) from err
    if client is None:
        try:
            return distributed.get_client()
        except ValueError as err:
            raise VelofitInputError(
                "backend='dask' found no dask.distributed Client: start one first (client = "
                "distributed.Client(...), which becomes the default) or pass client="
            ) from err
    if not isinstance(client, distributed.Client):
        raise VelofitTypeError(f"client must be a dask.distributed Client or None, got {type(client).__name__}")
    return client


def max_in_flight(client: Any) -> int:
    """Chunks submitted at a time: one per worker thread, plus one queued per worker."""
    nthreads = client.nthreads()
    return max(1, sum(nthreads.values()) + len(nthreads))


def _map_local(task, chunks, read, store, workers: int, one_at_a_time: Callable[[], bool] | None = None) -> None:
    if workers <= 1 or len(chunks) < 2:
        for cols in chunks:
            store(cols, task(*read(cols)))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="velofit-chunk") as pool:
        running: deque = deque()
        for cols in chunks:
            running.append((cols, pool.submit(task, *read(cols))))
            # Before the next read, fewer than the chunks allowed at once keep running.
            while running and len(running) >= (1 if one_at_a_time is not None and one_at_a_time() else workers):
                done, future = running.popleft()
                store(done, future.result())
        while running:
            done, future = running.popleft()
            store(done, future.result())


def map_chunks(
    task: Callable[..., Any],
    chunks: Sequence[np.ndarray],
    read: Callable[[np.ndarray], tuple],
    store: Callable[[np.ndarray, Any], None],
    *,
    backend: str = "local",
    client: Any = None,
    workers: int = 1,
    one_at_a_time: Callable[[], bool] | None = None,
) -> None:
    """Run ``task(*read(cols))`` for every chunk and ``store(cols, result)`` each result.

    Parameters
    ----------
    task
        Pure function of a chunk's input (for ``"dask"``: importable on the workers).
    chunks
        Positions of the genes of every chunk.
    read
        Reads a chunk's input here (the data are then sent to the cluster for ``"dask"``).
    store
        Receives every result, in this thread (in order of submission for ``"local"``, of
        completion for ``"dask"``).
    backend
        ``"local"`` or ``"dask"``.
    client
        ``distributed.Client`` for ``"dask"`` (default: the current default client).
    workers
        Chunks run at once with ``"local"`` (threads; inputs are read and results stored
        here, so at most ``workers`` chunks' data are held).
    one_at_a_time
        With ``"local"``: called before each chunk is read; while it returns ``True``, chunks
        run one at a time (e.g. while other work needs the cores).
    """
    if backend == "local":
        _map_local(task, chunks, read, store, workers, one_at_a_time)
        return
    if backend != "dask":
        raise VelofitInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from distributed import as_completed

    client = get_client(client)
    limit = max_in_flight(client)
    pending = iter(chunks)
    futures = {}

    def submit() -> bool:
        cols = next(pending, None)
        if cols is None:
            return False
        inputs = client.scatter(list(read(cols)), hash=False)
        future = client.submit(task, *inputs, pure=False)
        futures[future.key] = (cols, inputs)
        queue.add(future)
        return True

    queue = as_completed()
    for _ in range(limit):
        if not submit():
            break
    for future in queue:
        cols, inputs = futures.pop(future.key)
        result = future.result()  # raises the task's exception here
        del inputs, future
        store(cols, result)
        submit()
