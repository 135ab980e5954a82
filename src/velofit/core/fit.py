"""Fit the per-gene model to moments, chunk by chunk of genes (no AnnData here).

This is the boundary between NumPy and the jitted EM. A fit runs in three passes over
chunks of genes, each padded to one fixed width (one compilation serves every chunk):

1. :func:`prepare_chunk`: cell weights, residual scales, the genes that can be fitted,
   scVelo's initial parameters, and the moments of the cells the EM iterates on (a seeded
   subset of at most ``config.n_jacobian_cells``);
2. the EM of every fittable gene on those cells (:mod:`velofit.core.em_pool`: rounds of a
   few iterations, unfinished genes regrouped into full chunks between rounds);
3. :func:`finish_chunk`: every cell timed under the fitted parameters, in blocks of cells:
   by default at the nearest point of the branch its posterior under the gene's learned time
   prior chooses (:mod:`velofit.core.time_prior`), else (``config.time_prior=False``) at its
   nearest point (:mod:`velofit.core.programs`); and per-gene failures turned into status codes.

Each chunk of the input is read twice (passes 1 and 3), never the whole matrix at once.
On the local backend, pass 1 runs while XLA compiles the EM's program (in a thread), which
takes seconds on a first fit.

Precision: the per-gene EM runs in float64 throughout, on every device (inputs are
converted to float64, and ``jax.enable_x64`` is scoped to velofit's own calls: the user's
global JAX configuration is untouched). The E-step's exact time assignment and the
Levenberg-Marquardt M-step compare losses that differ in the last digits of float32, and
the reproducibility across chunk sizes and backends relies on one precision.

Scale: :func:`fit_columns` reads one chunk of genes at a time through a callback (never a
full float64 copy of the input), sizes chunks from a memory budget
(:mod:`velofit.core.memory`), and runs them here or on a ``dask.distributed`` cluster, on
the CPU or a GPU (:mod:`velofit.core.backends`). Compiled programs are cached on disk
between processes (:mod:`velofit.core.compile_cache`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import numpy as np

from .._io import column_index, padded_columns
from .._validation import check_fit_options, check_moments
from .backends import LOCAL_CPU_WORKERS, check_backend, map_chunks, resolve_device
from .em_pool import EMPool, run_pool
from .hard_em import EMConfig, timing_carry
from .initialize import MIN_CELLS, fitting_cells, gene_statistics, initial_parameters
from .memory import (
    DEFAULT_CONFIG,
    DEFAULT_MEMORY_BYTES,
    bytes_per_gene,
    chunk_footprint,
    default_chunk_size,
    effective_budget,
    model_width,
    parse_memory_budget,
    plan_width,
)
from .mstep import GeneData
from .programs import fit_program, no_penalty, program_rows
from .time_prior import learn_penalties

__all__ = ["DEFAULT_MEMORY_BYTES", "ChunkFit", "GeneFit", "default_chunk_size", "fit_chunk", "fit_columns", "fit_genes"]

#: Width of every default chunk on a CPU (the last chunk padded; fewer genes make one chunk),
#: so that one compiled program serves every dataset of at least ``n_jacobian_cells`` cells and
#: this many genes. Narrow, so that the EM's ``(<= 1024 cells, genes)`` arrays stay in cache (250
#: genes took 1.5x and 500 genes 2.5x the time of 16-64 at 5,000 x 1,000, warm); a multiple of
#: the SIMD width but not a power of two (64 was measured slower, likely rows 512 bytes apart
#: aliasing in the cache). Warm fits on 2 cores, 3 repeats: 5,000 x 1,000 took 3.5-3.8 s at 56
#: genes, 3.6-3.9 s at 60, 3.8-4.3 s at 63, 4.2-4.7 s at 64; 739 x 949, 2.8 s at 56 and 3.3-3.6 s
#: at 64; 20,000 x 1,000, 6.0-6.6 s at 56 and 6.4-7.2 s at 63. A GPU takes the widest chunk the
#: memory budget allows.
CPU_CHUNK_GENES = 56

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
        lambda cols: (mu[:, column_index(cols)], ms[:, column_index(cols)]), *mu.shape, config, chunk_size=chunk_size,
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
    times_out: np.ndarray | None = None,
) -> GeneFit:
    """Fit the dynamical model to ``n_genes`` genes read chunk by chunk with ``read``.

    Only one chunk's input is read at a time (plus those in flight on a cluster), so the
    input can live on disk or in a Dask array; each chunk is read twice (module docstring).
    Between the reads this process holds the iterated cells of every gene (about
    ``32 * min(n_cells, config.n_jacobian_cells)`` bytes per gene). The result is the same,
    to the last bits (measured: 1e-13 relative), for every ``chunk_size``/``memory_budget``
    giving chunks of at least two genes, and for both backends.

    Parameters
    ----------
    read
        ``read(cols) -> (mu, ms)``: the ``(n_cells, len(cols))`` float64 moments of the genes
        at sorted positions ``cols``, finite and non-negative (only read: views of the caller's
        arrays will do).
    n_cells, n_genes
        Data shape.
    config
        EM settings.
    chunk_size
        Genes per jitted chunk (padded to at least 2); default: the widest chunk whose
        working set fits ``memory_budget``, but on a CPU at most :data:`CPU_CHUNK_GENES`
        genes, whose iterated arrays stay in cache and whose compiled program every fit of
        as many genes or more shares.
    memory_budget
        Bytes (or a string such as ``"2GB"``) one chunk's working set may use (compiled EM
        buffers and host arrays,
        checked against XLA's accounting, see :mod:`velofit.core.memory`); default
        :data:`DEFAULT_MEMORY_BYTES` (2 GiB) when ``chunk_size`` is ``None``. With
        ``backend="dask"`` it applies to every chunk running on a worker thread. With
        ``backend="local"`` on a multi-core CPU, the EM pass runs two chunks at once in
        threads (:data:`~velofit.core.backends.LOCAL_CPU_WORKERS`) when both fit in it
        together, else one.
    seed
        Seed of the random subset of cells (``config.n_jacobian_cells``) from which M-step
        directions are computed when there are more cells than that.
    progress
        Called with the number of genes whose fit is settled (not fittable, or EM finished)
        after every chunk of every pass.
    backend
        ``"local"`` (this process) or ``"dask"`` (chunks submitted to ``client``).
    client
        A ``distributed.Client`` for ``backend="dask"`` (default: the default client).
    device
        ``"auto"`` (a GPU when JAX sees one, else the CPU), ``"cpu"`` or ``"gpu"``.
    times_out
        Optional ``(n_cells, n_genes)`` floating-point array that receives every cell's time
        (``nan`` where a gene is not fitted) and becomes :attr:`GeneFit.t`; e.g. float32 to
        halve the largest array of an atlas-sized fit (times are computed in float64 and
        rounded once when stored). Default: a new float64 array.

    Returns
    -------
    :class:`GeneFit`.
    """
    if times_out is not None and (times_out.shape != (n_cells, n_genes) or times_out.dtype.kind != "f"):
        raise ValueError(f"times_out must be a floating-point array of shape {(n_cells, n_genes)}, "
                         f"got {times_out.dtype} {times_out.shape}")
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
        # Every dataset's chunks as wide (the last padded), not balanced to its number of genes:
        # one compiled program, cached on disk, then serves every later fit of at least
        # n_jacobian_cells cells and CPU_CHUNK_GENES genes.
        max_width = CPU_CHUNK_GENES
    sizes = {"chunk_size": chunk_size, "memory_budget": memory_budget, "max_width": max_width}
    budget = effective_budget(memory_budget, chunk_size)

    sample = np.arange(n_cells)
    if n_cells > config.n_jacobian_cells:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n_cells, config.n_jacobian_cells, replace=False))

    out = _empty_fit(n_cells, n_genes, config.max_iter, times_out)
    # On a multi-core CPU, the EM pass runs chunks in threads when they fit the memory budget
    # (velofit.core.backends.LOCAL_CPU_WORKERS), and the last pass times blocks of cells in
    # threads (a few blocks' memory).
    threads = 1
    if backend == "local" and resolve_device(device).platform == "cpu" and (os.cpu_count() or 1) > 1:
        threads = LOCAL_CPU_WORKERS
    run = partial(map_chunks, backend=backend, client=client)

    # 1. Statistics, initial parameters and the iterated cells of every gene.
    def first_pass(width: int, read_chunk: Callable, one_at_a_time: Callable[[], bool] | None = None) -> tuple:
        chunks = [np.arange(start, min(start + width, n_genes)) for start in range(0, n_genes, width)]
        prepared: dict[int, Prepared] = {}
        # The pass holds host arrays only: the model's bytes per gene bound them.
        fits = budget is None or threads * bytes_per_gene(n_cells, config) * width <= budget
        run(partial(prepare_chunk, sample=sample), chunks, read_chunk,
            lambda cols, prep: prepared.__setitem__(int(cols[0]), prep), workers=threads if fits else 1,
            one_at_a_time=one_at_a_time)
        return chunks, prepared

    plan = partial(plan_width, n_cells, n_genes, config, footprint=footprint, **sizes)
    if backend == "local":
        width, (chunks, prepared) = _first_pass_while_compiling(
            plan, model_width(n_cells, n_genes, config, **sizes), first_pass, read
        )
    else:
        width = plan()
        chunks, prepared = first_pass(width, read)
    for cols in chunks:
        prep = prepared[int(cols[0])]
        out.std_u[cols], out.std_s[cols], out.n_cells[cols] = prep.std_u, prep.std_s, prep.n_cells
        out.status[cols] = prep.status
    if progress is not None and (unfittable := sum(cols.size - prepared[int(cols[0])].ok.size for cols in chunks)):
        progress(unfittable)
    workers = 1
    if threads > 1 and (budget is None or threads * footprint(n_cells, width) <= budget):
        workers = threads
    # 2. The EM of every fittable gene, regrouped between rounds (velofit.core.em_pool).
    preps = [prepared[int(cols[0])] for cols in chunks]
    pool = EMPool.create(
        *(np.concatenate([getattr(p, name) for p in preps], axis=-1)
          for name in ("mu", "ms", "weights", "std_u_ok", "std_s_ok", "theta0")),
        config.max_iter,
    )
    # The pool holds its own copy of the iterated cells: the chunks' copies (three float64
    # values per iterated cell and gene) are not needed for the rest of the fit.
    for prep in preps:
        prep.mu = prep.ms = prep.weights = np.zeros((0, 0))
    run_pool(pool, width, config, device, _counting(partial(run, workers=workers), pool, progress))
    # 3. Every cell timed under the fitted parameters, chunk by chunk of the input.
    offsets = np.cumsum([0] + [p.ok.size for p in preps])
    position = {int(cols[0]): np.arange(offsets[k], offsets[k + 1]) for k, cols in enumerate(chunks)}

    def read_fit(cols: np.ndarray) -> tuple:
        genes = position[int(cols[0])]
        prep = prepared[int(cols[0])]
        return (*read(cols), prep.bounds, prep.scales, prep.ok, pool.theta[:, genes],
                pool.t[:, genes], pool.trace[:, genes], pool.converged[genes], pool.n_iter[genes])

    task = partial(finish_chunk, width=width, sample=sample, config=config, device=device, threads=threads)
    run(task, chunks, read_fit, lambda cols, chunk: _store(out, cols, chunk))
    return out


class _Replanned(Exception):
    """The compiled program's accounting chose another width than the one a pass runs with."""


def _first_pass_while_compiling(plan: Callable[[], int], guess: int, first_pass: Callable, read: Callable) -> tuple:
    """Run ``first_pass(width, read)`` while ``plan()`` compiles the EM to choose the width.

    :func:`~velofit.core.memory.plan_width` compiles the fit's program (seconds, most of a
    small fit's time, on about one and a half of two cores) to read XLA's memory accounting;
    the first pass needs only host memory and the width. So the pass runs meanwhile with
    ``guess``, the width the memory model gives (:func:`~velofit.core.memory.model_width`),
    which the accounting confirms unless the budget is tight; otherwise the pass stops at
    its next chunk and runs again with the planned width. (The pass's results do not depend
    on the width: only the time is lost.) ``plan``'s error, if any, is raised here.
    While the plan runs, the pass runs one chunk at a time (``first_pass``'s ``one_at_a_time``):
    the compiler, the longer of the two, keeps most of the cores. Measured at 50,000 x 1,000
    on 2 cores: the first fit 1-1.5 s shorter.

    Returns
    -------
    ``(width, first_pass(width, read))``.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="velofit-compile") as compiler:
        planned = compiler.submit(plan)

        def read_while_valid(cols: np.ndarray) -> tuple:
            if planned.done() and (planned.exception() is not None or planned.result() != guess):
                raise _Replanned
            return read(cols)

        try:
            result = first_pass(guess, read_while_valid, one_at_a_time=lambda: not planned.done())
        except _Replanned:
            result = None
        width = planned.result()
    if result is None or width != guess:
        result = first_pass(width, read)
    return width, result


def _counting(run: Callable, pool: EMPool, progress: Callable[[int], None] | None) -> Callable:
    """``run`` that reports genes as their EM finishes."""
    if progress is None:
        return run

    def counted(task, chunks, read, store):
        def store_and_count(cols, result):
            before = int(np.count_nonzero(pool.done[cols]))
            store(cols, result)
            progress(int(np.count_nonzero(pool.done[cols])) - before)

        run(task, chunks, read, store_and_count)

    return counted


def _local_footprint(config: EMConfig, device: str, n_cells: int, width: int) -> int:
    return chunk_footprint(n_cells, width, config, resolve_device(device))


def _remote_footprint(client: Any, config: EMConfig, device: str, n_cells: int, width: int) -> int:
    # Measured (and compiled) on a worker: the compilation is cached there for its chunks.
    return client.submit(_local_footprint, config, device, n_cells, width, pure=False).result()


def _empty_fit(n_cells: int, n_genes: int, max_iter: int, times: np.ndarray | None = None) -> GeneFit:
    nan = np.full(n_genes, np.nan)
    # Not filled: _store writes every column once, NaN where a gene has no times (filling
    # first wrote the largest array twice: 0.9 s of a 10 s fit at 50,000 x 1,000).
    if times is None:
        times = np.empty((n_cells, n_genes))
    return GeneFit(
        alpha=nan.copy(), beta=nan.copy(), gamma=nan.copy(), t_=nan.copy(), scaling=nan.copy(),
        std_u=nan.copy(), std_s=nan.copy(), loss=nan.copy(),
        n_cells=np.zeros(n_genes, np.int64),
        converged=np.zeros(n_genes, bool),
        n_iter=np.zeros(n_genes, np.int64),
        trace=np.full((max_iter + 1, n_genes), np.nan),
        t=times,
        weights=np.zeros((n_cells, n_genes), bool),
        status=np.full(n_genes, STATUS_FEW_CELLS, dtype=object),
        span=nan.copy(),
    )


@dataclass
class Prepared:
    """A chunk's statistics, initial parameters and iterated cells (:func:`prepare_chunk`).

    Attributes
    ----------
    std_u, std_s, n_cells, status
        ``(k,)`` as in :class:`GeneFit` (status before the EM: ``"ok"`` means fittable).
    ok
        Positions of the fittable genes.
    std_u_ok, std_s_ok
        ``(len(ok),)`` residual scales of those genes.
    theta0
        ``(5, len(ok))`` initial log-parameters.
    mu, ms, weights
        ``(n_sample, len(ok))`` float64 moments and weights of the iterated cells.
    bounds
        ``(2, k)`` upper bounds of the cells each gene is fitted on
        (:attr:`~velofit.core.initialize.GeneStatistics.bounds`), so that the last pass
        need not compute the percentiles again.
    """

    std_u: np.ndarray
    std_s: np.ndarray
    n_cells: np.ndarray
    status: np.ndarray
    ok: np.ndarray
    std_u_ok: np.ndarray
    std_s_ok: np.ndarray
    theta0: np.ndarray
    mu: np.ndarray
    ms: np.ndarray
    weights: np.ndarray
    bounds: np.ndarray

    @property
    def scales(self) -> np.ndarray:
        """``(2, k)`` ``std_u`` and ``std_s``: what the last pass needs besides ``bounds``."""
        return np.stack([self.std_u, self.std_s])


def _as_fortran(mu: np.ndarray, ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # One memory layout whatever the storage of the input: NumPy's reductions sum in an order
    # that depends on it, and the fit must be bitwise the same for every input format.
    return np.asfortranarray(mu, dtype=np.float64), np.asfortranarray(ms, dtype=np.float64)


def _fittable(n_cells: np.ndarray, std_u: np.ndarray, std_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    enough = n_cells >= MIN_CELLS
    varies = (std_u > 0) & (std_s > 0)
    status = np.full(n_cells.size, STATUS_FEW_CELLS, dtype=object)
    status[enough & ~varies] = STATUS_CONSTANT
    ok = np.flatnonzero(enough & varies)
    status[ok] = STATUS_OK
    return status, ok


def prepare_chunk(mu: np.ndarray, ms: np.ndarray, *, sample: np.ndarray) -> Prepared:
    """Statistics, fittable genes, initial parameters and iterated cells of one chunk (pure).

    Parameters
    ----------
    mu, ms
        ``(n_cells, k)`` moments of the chunk's genes.
    sample
        Sorted indices of the cells the EM iterates on.

    Returns
    -------
    :class:`Prepared`.
    """
    mu, ms = _as_fortran(mu, ms)
    stats = gene_statistics(mu, ms)
    status, ok = _fittable(stats.n_cells, stats.std_u, stats.std_s)
    if ok.size == mu.shape[1]:  # usually: no copies of the chunk (the first pass's peak memory)
        theta0 = np.log(initial_parameters(mu, ms, stats))
    elif ok.size:
        theta0 = np.log(initial_parameters(mu[:, ok], ms[:, ok], _subset(stats, ok)))
    else:
        theta0 = np.zeros((5, 0))
    rows = np.ix_(sample, ok)
    return Prepared(
        std_u=stats.std_u, std_s=stats.std_s, n_cells=stats.n_cells, status=status, ok=ok,
        std_u_ok=stats.std_u[ok], std_s_ok=stats.std_s[ok], theta0=theta0,
        mu=mu[rows], ms=ms[rows], weights=stats.weights[rows].astype(np.float64), bounds=stats.bounds,
    )


def finish_chunk(
    mu: np.ndarray, ms: np.ndarray, bounds: np.ndarray, scales: np.ndarray, ok: np.ndarray, theta: np.ndarray,
    t_sample: np.ndarray, trace: np.ndarray, converged: np.ndarray, n_iter: np.ndarray, *, width: int,
    sample: np.ndarray, config: EMConfig, device: str = "auto", threads: int = 1,
) -> ChunkFit:
    """Time every cell of one chunk under its fitted parameters and collect its results (pure).

    Parameters
    ----------
    mu, ms
        ``(n_cells, k)`` moments of the chunk's genes.
    bounds
        ``(2, k)`` upper bounds of their fitting cells, from :func:`prepare_chunk`.
    scales
        ``(2, k)`` their ``std_u`` and ``std_s``, from :func:`prepare_chunk`.
    ok
        Positions of its genes fitted by the EM.
    theta
        ``(5, len(ok))`` fitted log-parameters.
    t_sample
        ``(n_sample, len(ok))`` times of the iterated cells at the EM's end.
    trace, converged, n_iter
        The EM's record of those genes.
    width
        Compiled chunk width.
    sample
        Sorted indices of the iterated cells.
    config
        EM settings.
    device
        ``"auto"``, ``"cpu"`` or ``"gpu"``, resolved where the chunk runs.
    threads
        Blocks of cells timed at once (see :func:`_assign_times`); the result does not
        depend on it.

    Returns
    -------
    :class:`ChunkFit`.
    """
    # The statistics come from the first pass; the mask is elementwise, so the input's
    # layout does not matter here and the rows of every block are read as they are stored.
    n_cells = mu.shape[0]
    weights = fitting_cells(mu, ms, bounds)
    count = weights.sum(axis=0)
    std_u, std_s = scales
    status, _ = _fittable(count, std_u, std_s)
    status[ok] = STATUS_NONFINITE
    chunk = ChunkFit(
        std_u=std_u, std_s=std_s, n_cells=count, status=status, weights=weights,
        ok=np.zeros(0, np.int64), theta=np.zeros((5, 0)), loss=np.zeros(0), converged=np.zeros(0, bool),
        n_iter=np.zeros(0, np.int64), span=np.zeros(0), trace=np.zeros((config.max_iter + 1, 0)),
        t=np.zeros((n_cells, 0)),
    )
    if ok.size == 0:
        return chunk
    target = resolve_device(device)
    with jax.enable_x64(True), jax.default_device(target):
        if config.time_prior:
            # The residual variance of the EM's last iteration, on its iterated cells (losses
            # never increase: the last is the smallest).
            variance = np.nanmin(trace, axis=0) / (2.0 * np.maximum(weights[sample][:, ok].sum(axis=0), 1))
            penalty = learn_penalties(theta, (mu, ms), ok, std_u[ok], std_s[ok], variance, sample, target, width,
                                      config.n_grid)
            previous = None  # the MAP branch's nearest point, not the EM's nearest point
        else:
            penalty = no_penalty(ok.size, config)
            previous = (t_sample, sample)
        # Pad to the chunk width by repeating the first fitted gene: one compiled shape.
        pad = np.concatenate([ok, np.full(width - ok.size, ok[0])])
        fill = np.full(width - ok.size, 0)
        if previous is not None:
            previous = (np.concatenate([t_sample, t_sample[:, fill]], axis=1), sample)
        # Host arrays sent with device_put: jnp.asarray compiles a small program per shape.
        theta_pad = np.concatenate([theta, theta[:, fill]], axis=1)
        penalty = np.concatenate([penalty, penalty[:, :, fill]], axis=2)
        per_gene = jax.device_put(
            tuple(np.asarray(a, np.float64) for a in (std_u[pad], std_s[pad], theta_pad, penalty)), target
        )
        t, loss = _assign_times(per_gene, previous, (mu, ms, weights), ok, config, target, threads)
    theta, t, loss = np.exp(theta), t[:, : ok.size], loss[: ok.size]

    finite = np.all(np.isfinite(theta), axis=0) & np.all(np.isfinite(t), axis=0) & np.isfinite(loss)
    chunk.status[ok[finite]] = STATUS_OK
    chunk.status[ok[~finite]] = STATUS_NONFINITE
    if not finite.all():
        t = t[:, finite]
    fitted_cells = chunk.weights[:, column_index(ok[finite])]
    span = np.max(np.where(fitted_cells, t, -np.inf), axis=0, initial=0.0) if t.size else np.zeros(0)
    chunk.ok, chunk.theta, chunk.loss, chunk.t = ok[finite], theta[:, finite], loss[finite], t
    chunk.trace, chunk.converged, chunk.n_iter, chunk.span = (
        trace[:, finite], converged[finite], n_iter[finite], span
    )
    return chunk


def fit_chunk(
    mu: np.ndarray, ms: np.ndarray, *, width: int, sample: np.ndarray, config: EMConfig, device: str = "auto",
    threads: int = 1,
) -> ChunkFit:
    """Fit one chunk of genes on its own: :func:`prepare_chunk`, the EM, :func:`finish_chunk`.

    :func:`fit_columns` runs the same steps over all chunks at once, regrouping genes between
    EM rounds; every gene's result is the same either way, to the last bits.

    Parameters
    ----------
    mu, ms
        ``(n_cells, k)`` moments of the chunk's genes, ``k <= width``.
    width
        Compiled chunk width (the chunk is padded to it).
    sample
        Sorted indices of the cells the EM iterates on.
    config
        EM settings.
    device
        ``"auto"``, ``"cpu"`` or ``"gpu"``.
    threads
        Blocks of cells timed at once by :func:`finish_chunk`.

    Returns
    -------
    :class:`ChunkFit`.
    """
    prep = prepare_chunk(mu, ms, sample=sample)
    pool = EMPool.create(prep.mu, prep.ms, prep.weights, prep.std_u_ok, prep.std_s_ok, prep.theta0, config.max_iter)
    if prep.ok.size:
        run_pool(pool, width, config, device, map_chunks)
    return finish_chunk(mu, ms, prep.bounds, prep.scales, prep.ok, pool.theta, pool.t,
                        pool.trace, pool.converged, pool.n_iter, width=width, sample=sample, config=config,
                        device=device, threads=threads)


def _assign_times(per_gene, previous, arrays, cols, config: EMConfig, device: jax.Device, threads: int = 1):
    """Time every cell under the fitted parameters, block by block of one compiled shape.

    ``per_gene`` is ``(std_u, std_s, theta, penalty)`` on the device, padded to the chunk
    width: the residual scales, the ``(5, width)`` log-parameters and the ``(2, n_grid,
    width)`` grid penalty of the search (the learned time prior's, or zeros: the nearest
    point). ``previous`` is ``None`` or ``(t_sample, sample)``: the ``(n_sample, width)``
    times of the iterated cells (sorted rows ``sample``) at the EM's end, which those cells
    keep unless the search finds nearer points; every other cell has none (``nan``). The
    iterated cells are then timed first, in blocks of their own, then the other cells in
    order: a block without previous times skips the comparison with them
    (:func:`velofit.core.hard_em.e_step`; 3.4-3.7 against 3.7-4.1 ms per block of 1,024 x
    64). ``arrays`` are the chunk's ``(mu, ms, weights)``, read at columns ``cols`` one block
    at a time and padded to the width by repeating the first column (:func:`_rows_block`).
    The last block is padded by repeating its first row with weight 0. Returns the
    ``(n_cells, width)`` times and the ``(width,)`` loss over all cells (block sums added in
    block order, so it does not depend on the chunk width or on ``threads``).

    Blocks are gathered here, in this thread, and run ``threads`` at a time in a thread pool
    that only calls the compiled program: XLA runs one program at a time per caller and uses
    the second core of a CPU only in part (measured on 2 cores, blocks of 512 cells x 64
    genes: 6.6 ms per block alone, 4.3 ms with two callers). Host arrays are allocated in
    this thread only (glibc's per-thread heaps: :mod:`velofit._heap`).
    """
    std_u, std_s, theta, penalty = per_gene
    n_cells, width = arrays[0].shape[0], theta.shape[1]
    block = program_rows(n_cells, config)
    program = fit_program(block, width, config, device)
    t = np.empty((n_cells, width))
    loss = np.zeros(width)
    pending: deque = deque()
    # At most this many blocks wait: memory does not grow with the number of cells.
    in_flight = max(1, threads) + 1
    # The parts of the program's input that no block changes, made once: GeneData.sample
    # (read by the M-step only) and the carry but for its times.
    rows, carry, begin, final = jax.device_put(
        (np.arange(block, dtype=np.int64), timing_carry(theta, None, config.max_iter), np.bool_(False),
         np.bool_(True)), device
    )

    def collect() -> None:
        rows_done, n, result = pending.popleft()
        out, _ = result.result() if isinstance(result, Future) else result
        t[rows_done] = np.asarray(out.state.t)[:n]
        loss[:] += np.asarray(out.state.loss)

    def launch(t_block, data):
        return program(carry._replace(state=carry.state._replace(t=t_block)), data, theta, penalty, begin, final)

    def run(t_block, data):
        return jax.block_until_ready(launch(t_block, data))

    with ThreadPoolExecutor(threads, thread_name_prefix="velofit-times") if threads > 1 else nullcontext() as pool:
        for group, group_times in _timing_groups(n_cells, previous):
            for start in range(0, group.size, block):
                rows_block = column_index(group[start : start + block])  # a slice where consecutive
                mu, ms, w = (_rows_block(a, rows_block, block, cols, width) for a in arrays)
                n = min(block, group.size - start)
                t_block = np.full((block, width), np.nan)
                if group_times is not None:
                    t_block[:n] = group_times[start : start + n]
                t_block[n:] = t_block[0]
                w[n:] = 0.0
                # (device_put costs half of jnp.asarray's dispatch per array: 37 against 83 us.)
                mu, ms, w, t_block = jax.device_put((mu, ms, w, t_block), device)
                data = GeneData(mu, ms, w, std_u, std_s, rows)
                # Without threads, dispatch is asynchronous: the next block is gathered while
                # this one computes.
                pending.append((rows_block, n, pool.submit(run, t_block, data) if pool else launch(t_block, data)))
                if len(pending) > in_flight:
                    collect()
        while pending:
            collect()
    return t, loss


def _timing_groups(n_cells: int, previous) -> list[tuple[np.ndarray, Any]]:
    """The cells in the order :func:`_assign_times` times them, as sorted groups with their
    previous times: the iterated cells (``sample``, ``t_sample`` of ``previous``), then the
    others (``None``); without ``previous``, all cells in order (``None``)."""
    if previous is None:
        return [(np.arange(n_cells), None)]
    t_sample, sample = previous
    rest = np.ones(n_cells, bool)
    rest[sample] = False
    return [(sample, t_sample), (np.flatnonzero(rest), None)]


def _rows_block(a: np.ndarray, rows: slice | np.ndarray, block: int, cols: np.ndarray, width: int) -> np.ndarray:
    """Rows ``rows`` of ``a`` at columns ``cols`` as a C-ordered float64 ``(block, width)``
    array, padded by repeating its first column (:func:`~velofit._io.padded_columns`) and its
    first row."""
    out = np.empty((block, width))
    values = a[rows]
    n = values.shape[0]
    padded_columns(values, cols, width, out=out[:n])
    out[n:] = out[0]
    return out


def _store(out: GeneFit, cols: np.ndarray, chunk: ChunkFit) -> None:
    """Copy one chunk's results into the whole fit."""
    out.std_u[cols], out.std_s[cols] = chunk.std_u, chunk.std_s
    out.n_cells[cols] = chunk.n_cells
    # Slices where the columns are consecutive (usually): NumPy scatters through an index
    # array element by element.
    out.weights[:, column_index(cols)] = chunk.weights
    out.status[cols] = chunk.status
    target = cols[chunk.ok]
    out.alpha[target], out.beta[target], out.gamma[target], out.t_[target], out.scaling[target] = chunk.theta
    out.loss[target] = chunk.loss
    out.t[:, column_index(target)] = chunk.t
    unfitted = cols[np.setdiff1d(np.arange(cols.size), chunk.ok)]
    if unfitted.size:
        out.t[:, unfitted] = np.nan
    out.trace[:, target] = chunk.trace
    out.converged[target] = chunk.converged
    out.n_iter[target] = chunk.n_iter
    out.span[target] = chunk.span


def _subset(stats, idx):
    return type(stats)(stats.weights[:, idx], stats.std_u[idx], stats.std_s[idx], stats.n_cells[idx],
                       stats.bounds[:, idx])
