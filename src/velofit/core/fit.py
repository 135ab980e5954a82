"""Fit the per-gene model to moments, chunk by chunk of genes (no AnnData here).

This is the boundary between NumPy and the jitted EM: it picks the genes that can be
fitted, initialises them, pads each chunk to a fixed width (one compilation serves every
chunk), runs the EM and turns per-gene failures into status codes.

Precision: the per-gene EM runs in float64 throughout, on every device (inputs are
converted to float64, and ``jax.enable_x64`` is scoped to velofit's own calls: the user's
global JAX configuration is untouched). The E-step's exact time assignment and the
Levenberg-Marquardt M-step compare losses that differ in the last digits of float32, and
the bitwise reproducibility across chunk sizes and backends relies on one precision.

Scale: :func:`fit_columns` reads one chunk of genes at a time through a callback (never a
full float64 copy of the input), sizes chunks from a memory budget
(:mod:`velofit.core.memory`), and runs them here or on a ``dask.distributed`` cluster, on
the CPU or a GPU (:mod:`velofit.core.backends`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_fit_options, check_moments
from .backends import check_backend, map_chunks, resolve_device
from .hard_em import EMConfig, run_jit
from .initialize import MIN_CELLS, gene_statistics, initial_parameters
from .memory import (
    DEFAULT_CONFIG,
    DEFAULT_MEMORY_BYTES,
    chunk_footprint,
    default_chunk_size,
    parse_memory_budget,
    plan_width,
)
from .mstep import GeneData

__all__ = ["DEFAULT_MEMORY_BYTES", "ChunkFit", "GeneFit", "default_chunk_size", "fit_chunk", "fit_columns", "fit_genes"]

#: Widest default chunk on a CPU: the EM's ``(<= 1024 cells, genes)`` arrays then stay in
#: cache. Measured at 5000 cells x 1000 genes on 2 cores: 16-64 genes 14-17 s, 250 genes
#: 24 s, 500 genes 42 s (warm). A GPU takes the widest chunk the memory budget allows.
CPU_CHUNK_GENES = 64

STATUS_OK = "ok"
STATUS_FEW_CELLS = "too few cells with unspliced and spliced counts"
STATUS_CONSTANT = "constant unspliced or spliced"
STATUS_NONFINITE = "fit did not give finite values"


@dataclass
class GeneFit:
    """Per-gene results of :func:`fit_genes` (NumPy arrays; ``nan`` where not fitted).

    Attributes
    ----------
    alpha, beta, gamma, t_, scaling
        ``(n_genes,)`` kinetic parameters (``beta`` in scaled-unspliced units).
    std_u, std_s
        ``(n_genes,)`` standard deviations of ``Mu`` and ``Ms`` over the fitted cells.
    loss
        ``(n_genes,)`` final weighted sum of squared standardised residuals.
    n_cells
        ``(n_genes,)`` number of cells each gene was fitted on.
    converged, n_iter
        ``(n_genes,)`` convergence flag (last stage) and iterations run.
    trace
        ``(max_iter + 1, n_genes)`` loss per iteration.
    t
        ``(n_cells, n_genes)`` absolute time of every cell on every gene's clock.
    weights
        ``(n_cells, n_genes)`` boolean mask of the cells each gene was fitted on.
    status
        ``(n_genes,)`` ``"ok"`` or the reason a gene was not fitted.
    span
        ``(n_genes,)`` largest ``t`` over the cells each gene was fitted on (``nan`` where
        not fitted; ``0`` where no cell has a finite time).
    """

    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    t_: np.ndarray
    scaling: np.ndarray
    std_u: np.ndarray
    std_s: np.ndarray
    loss: np.ndarray
    n_cells: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    trace: np.ndarray
    t: np.ndarray
    weights: np.ndarray
    status: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    span: np.ndarray = field(default_factory=lambda: np.array([]))

    @property
    def fitted(self) -> np.ndarray:
        """Boolean ``(n_genes,)`` mask of the genes fitted successfully."""
        return self.status == STATUS_OK


@dataclass
class ChunkFit:
    """Results of one chunk of genes (:func:`fit_chunk`), indexed by the chunk's genes.

    Attributes
    ----------
    std_u, std_s, n_cells, status
        ``(k,)`` as in :class:`GeneFit`.
    weights
        ``(n_cells, k)`` boolean mask of the fitting cells.
    ok
        Positions (within the chunk) of the genes fitted with finite results.
    theta
        ``(5, len(ok))`` ``alpha, beta, gamma, t_, scaling`` of those genes.
    loss, converged, n_iter, span
        ``(len(ok),)``.
    trace
        ``(max_iter + 1, len(ok))``.
    t
        ``(n_cells, len(ok))``.
    """

    std_u: np.ndarray
    std_s: np.ndarray
    n_cells: np.ndarray
    status: np.ndarray
    weights: np.ndarray
    ok: np.ndarray
    theta: np.ndarray
    loss: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    span: np.ndarray
    trace: np.ndarray
    t: np.ndarray


def fit_genes(
    mu: np.ndarray,
    ms: np.ndarray,
    config: EMConfig = DEFAULT_CONFIG,
    *,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    backend: str = "local",
    client: Any = None,
    device: str = "auto",
) -> GeneFit:
    """Fit the dynamical model to every column of ``mu``/``ms`` (arrays in memory).

    Parameters
    ----------
    mu, ms
        ``(n_cells, n_genes)`` finite, non-negative unspliced and spliced moments (dense or
        SciPy sparse; validated and copied to float64).
    config
        EM settings.
    chunk_size, memory_budget, seed, progress, backend, client, device
        As for :func:`fit_columns`.

    Returns
    -------
    :class:`GeneFit`.
    """
    mu, ms = check_moments(mu, ms)
    return fit_columns(
        lambda cols: (mu[:, cols], ms[:, cols]), *mu.shape, config, chunk_size=chunk_size,
        memory_budget=memory_budget, seed=seed, progress=progress, backend=backend, client=client, device=device,
    )


def fit_columns(
    read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    n_cells: int,
    n_genes: int,
    config: EMConfig = DEFAULT_CONFIG,
    *,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    backend: str = "local",
    client: Any = None,
    device: str = "auto",
) -> GeneFit:
    """Fit the dynamical model to ``n_genes`` genes read chunk by chunk with ``read``.

    Only one chunk's input is read at a time (plus those in flight on a cluster), so the
    input can live on disk or in a Dask array. The result is bitwise the same for every
    ``chunk_size``/``memory_budget`` giving chunks of at least two genes and for both
    backends.

    Parameters
    ----------
    read
        ``read(cols) -> (mu, ms)``: the ``(n_cells, len(cols))`` float64 moments of the genes
        at sorted positions ``cols``, finite and non-negative (new arrays).
    n_cells, n_genes
        Data shape.
    config
        EM settings.
    chunk_size
        Genes per jitted chunk (padded to at least 2); default: the widest chunk whose
        working set fits ``memory_budget``, but on a CPU at most about
        :data:`CPU_CHUNK_GENES` genes, whose iterated arrays stay in cache.
    memory_budget
        Bytes (or a string such as ``"2GB"``) one chunk's working set may use (compiled EM
        buffers and host arrays,
        checked against XLA's accounting, see :mod:`velofit.core.memory`); default
        :data:`DEFAULT_MEMORY_BYTES` (2 GiB) when ``chunk_size`` is ``None``. With
        ``backend="dask"`` it applies to every chunk running on a worker thread.
    seed
        Seed of the random subset of cells (``config.n_jacobian_cells``) from which M-step
        directions are computed when there are more cells than that.
    progress
        Called with the number of genes finished after every chunk.
    backend
        ``"local"`` (this process) or ``"dask"`` (chunks submitted to ``client``).
    client
        A ``distributed.Client`` for ``backend="dask"`` (default: the default client).
    device
        ``"auto"`` (a GPU when JAX sees one, else the CPU), ``"cpu"`` or ``"gpu"``.

    Returns
    -------
    :class:`GeneFit`.
    """
    check_fit_options(
        max_iter=config.max_iter, n_explicit=config.n_explicit, tol=config.tol, chunk_size=chunk_size, seed=seed
    )
    check_backend(backend, client)
    memory_budget = parse_memory_budget(memory_budget)
    resolve_device(device)  # fail early on this process; workers resolve their own
    if backend == "dask":
        from .backends import get_client

        client = get_client(client)
        footprint = partial(_remote_footprint, client, config, device)
    else:
        footprint = partial(_local_footprint, config, device)
    max_width = None
    if resolve_device(device).platform == "cpu":
        max_width = -(-n_genes // -(-n_genes // CPU_CHUNK_GENES))  # balanced chunks: little padding
    width = plan_width(n_cells, n_genes, config, chunk_size=chunk_size, memory_budget=memory_budget,
                       footprint=footprint, max_width=max_width)

    sample = np.arange(n_cells)
    if n_cells > config.n_jacobian_cells:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n_cells, config.n_jacobian_cells, replace=False))

    out = _empty_fit(n_cells, n_genes, config.max_iter)

    def store(cols: np.ndarray, chunk: ChunkFit) -> None:
        _store(out, cols, chunk)
        if progress is not None:
            progress(len(cols))

    chunks = [np.arange(start, min(start + width, n_genes)) for start in range(0, n_genes, width)]
    task = partial(fit_chunk, width=width, sample=sample, config=config, device=device)
    map_chunks(task, chunks, read, store, backend=backend, client=client)
    return out


def _local_footprint(config: EMConfig, device: str, n_cells: int, width: int) -> int:
    return chunk_footprint(n_cells, width, config, resolve_device(device))


def _remote_footprint(client: Any, config: EMConfig, device: str, n_cells: int, width: int) -> int:
    # Measured (and compiled) on a worker: the compilation is cached there for its chunks.
    return client.submit(_local_footprint, config, device, n_cells, width, pure=False).result()


def _empty_fit(n_cells: int, n_genes: int, max_iter: int) -> GeneFit:
    nan = np.full(n_genes, np.nan)
    return GeneFit(
        alpha=nan.copy(), beta=nan.copy(), gamma=nan.copy(), t_=nan.copy(), scaling=nan.copy(),
        std_u=nan.copy(), std_s=nan.copy(), loss=nan.copy(),
        n_cells=np.zeros(n_genes, np.int64),
        converged=np.zeros(n_genes, bool),
        n_iter=np.zeros(n_genes, np.int64),
        trace=np.full((max_iter + 1, n_genes), np.nan),
        t=np.full((n_cells, n_genes), np.nan),
        weights=np.zeros((n_cells, n_genes), bool),
        status=np.full(n_genes, STATUS_FEW_CELLS, dtype=object),
        span=nan.copy(),
    )


def fit_chunk(
    mu: np.ndarray, ms: np.ndarray, *, width: int, sample: np.ndarray, config: EMConfig, device: str = "auto"
) -> ChunkFit:
    """Fit one chunk of genes (a pure function of its arguments; runs on a Dask worker too).

    Parameters
    ----------
    mu, ms
        ``(n_cells, k)`` float64 moments of the chunk's genes, ``k <= width``.
    width
        Compiled chunk width (the chunk is padded to it).
    sample
        Sorted cell indices of the M-step's directions.
    config
        EM settings.
    device
        ``"auto"``, ``"cpu"`` or ``"gpu"``, resolved where the chunk runs.

    Returns
    -------
    :class:`ChunkFit`.
    """
    # One memory layout whatever the storage of the input: NumPy's reductions sum in an order
    # that depends on it, and the fit must be bitwise the same for every input format.
    mu, ms = np.asfortranarray(mu, dtype=np.float64), np.asfortranarray(ms, dtype=np.float64)
    n_cells, k = mu.shape
    stats = gene_statistics(mu, ms)
    enough = stats.n_cells >= MIN_CELLS
    varies = (stats.std_u > 0) & (stats.std_s > 0)
    status = np.full(k, STATUS_FEW_CELLS, dtype=object)
    status[enough & ~varies] = STATUS_CONSTANT
    chunk = ChunkFit(
        std_u=stats.std_u, std_s=stats.std_s, n_cells=stats.n_cells, status=status, weights=stats.weights > 0,
        ok=np.zeros(0, np.int64), theta=np.zeros((5, 0)), loss=np.zeros(0), converged=np.zeros(0, bool),
        n_iter=np.zeros(0, np.int64), span=np.zeros(0), trace=np.zeros((config.max_iter + 1, 0)),
        t=np.zeros((n_cells, 0)),
    )
    ok = np.flatnonzero(enough & varies)
    if ok.size == 0:
        return chunk

    theta0 = np.log(initial_parameters(mu[:, ok], ms[:, ok], _subset(stats, ok)))
    # Pad to the chunk width by repeating the first fittable gene: one compiled shape.
    pad = np.concatenate([ok, np.full(width - ok.size, ok[0])])
    theta0 = np.concatenate([theta0, np.repeat(theta0[:, :1], width - ok.size, axis=1)], axis=1)
    with jax.enable_x64(True), jax.default_device(resolve_device(device)):
        gene_data = GeneData(
            *(jnp.asarray(a[:, pad], dtype=jnp.float64) for a in (mu, ms, stats.weights)),
            *(jnp.asarray(a[pad], dtype=jnp.float64) for a in (stats.std_u, stats.std_s)),
            jnp.asarray(sample),
        )
        del mu, ms
        state, trace = run_jit(gene_data, jnp.asarray(theta0, dtype=jnp.float64), config)
        del gene_data
        theta = np.exp(np.asarray(state.theta))[:, : ok.size]
        t = np.asarray(state.t)[:, : ok.size]
        loss = np.asarray(state.loss)[: ok.size]
        trace = np.asarray(trace)[:, : ok.size]
        converged = np.asarray(state.converged)[: ok.size]
        n_iter = np.asarray(state.n_iter)[: ok.size]
        del state

    finite = np.all(np.isfinite(theta), axis=0) & np.all(np.isfinite(t), axis=0) & np.isfinite(loss)
    chunk.status[ok[finite]] = STATUS_OK
    chunk.status[ok[~finite]] = STATUS_NONFINITE
    fitted_cells = chunk.weights[:, ok[finite]]
    t = t[:, finite]
    span = np.max(np.where(fitted_cells, t, -np.inf), axis=0, initial=0.0) if t.size else np.zeros(0)
    chunk.ok, chunk.theta, chunk.loss, chunk.t = ok[finite], theta[:, finite], loss[finite], t
    chunk.trace, chunk.converged, chunk.n_iter, chunk.span = (
        trace[:, finite], converged[finite], n_iter[finite], span
    )
    return chunk


def _store(out: GeneFit, cols: np.ndarray, chunk: ChunkFit) -> None:
    """Copy one chunk's results into the whole fit."""
    out.std_u[cols], out.std_s[cols] = chunk.std_u, chunk.std_s
    out.n_cells[cols] = chunk.n_cells
    out.weights[:, cols] = chunk.weights
    out.status[cols] = chunk.status
    target = cols[chunk.ok]
    out.alpha[target], out.beta[target], out.gamma[target], out.t_[target], out.scaling[target] = chunk.theta
    out.loss[target] = chunk.loss
    out.t[:, target] = chunk.t
    out.trace[:, target] = chunk.trace
    out.converged[target] = chunk.converged
    out.n_iter[target] = chunk.n_iter
    out.span[target] = chunk.span


def _subset(stats, idx):
    return type(stats)(stats.weights[:, idx], stats.std_u[idx], stats.std_s[idx], stats.n_cells[idx])
