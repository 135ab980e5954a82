"""Fit the per-gene model to arrays of moments, chunk by chunk of genes (no AnnData here).

This is the boundary between NumPy and the jitted EM: it picks the genes that can be
fitted, initialises them, pads each chunk to a fixed width (one compilation serves every
chunk), runs the EM in float64 (scoped with ``jax.enable_x64``, the user's global JAX
configuration is untouched) and turns per-gene failures into status codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_fit_options, check_moments
from .hard_em import EMConfig, run_jit
from .initialize import MIN_CELLS, gene_statistics, initial_parameters
from .mstep import GeneData

#: Default memory budget of one chunk, in bytes (about 40 float64 cells x genes arrays live).
DEFAULT_MEMORY_BYTES = 2 * 1024**3
_LIVE_ARRAYS = 48

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

    @property
    def fitted(self) -> np.ndarray:
        """Boolean ``(n_genes,)`` mask of the genes fitted successfully."""
        return self.status == STATUS_OK


def default_chunk_size(n_cells: int, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> int:
    """Genes per chunk so that one chunk's working set stays within ``memory_bytes``.

    Parameters
    ----------
    n_cells
        Number of cells.
    memory_bytes
        Memory budget of one chunk.

    Returns
    -------
    A chunk width of at least 1 gene.
    """
    return max(1, int(memory_bytes // (_LIVE_ARRAYS * 8 * max(n_cells, 1))))


def fit_genes(
    mu: np.ndarray,
    ms: np.ndarray,
    config: EMConfig = EMConfig(),
    *,
    chunk_size: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> GeneFit:
    """Fit the dynamical model to every column of ``mu``/``ms``.

    Parameters
    ----------
    mu, ms
        ``(n_cells, n_genes)`` finite, non-negative unspliced and spliced moments (dense or
        SciPy sparse; validated and copied to float64).
    config
        EM settings.
    chunk_size
        Genes per jitted chunk; default from :func:`default_chunk_size`.
    seed
        Seed of the random subset of cells (``config.n_jacobian_cells``) from which M-step
        directions are computed when there are more cells than that.
    progress
        Called with the number of genes finished after every chunk.

    Returns
    -------
    :class:`GeneFit`.
    """
    mu, ms = check_moments(mu, ms)
    check_fit_options(
        max_iter=config.max_iter, n_explicit=config.n_explicit, tol=config.tol, chunk_size=chunk_size, seed=seed
    )
    n_cells, n_genes = mu.shape
    # At least two genes per chunk: XLA vectorises a (n_cells, 1) reduction differently, and
    # results must not depend on the chunk width.
    width = max(2, min(chunk_size or default_chunk_size(n_cells), n_genes))

    sample = np.arange(n_cells)
    if n_cells > config.n_jacobian_cells:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n_cells, config.n_jacobian_cells, replace=False))

    out = _empty_fit(n_cells, n_genes, config.max_iter)
    for start in range(0, n_genes, width):
        cols = np.arange(start, min(start + width, n_genes))
        _fit_chunk(mu[:, cols], ms[:, cols], cols, width, sample, config, out)
        if progress is not None:
            progress(len(cols))
    return out


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
    )


def _fit_chunk(mu, ms, cols, width, sample, config: EMConfig, out: GeneFit) -> None:
    stats = gene_statistics(mu, ms)
    out.std_u[cols], out.std_s[cols] = stats.std_u, stats.std_s
    out.n_cells[cols] = stats.n_cells
    out.weights[:, cols] = stats.weights > 0
    enough = stats.n_cells >= MIN_CELLS
    varies = (stats.std_u > 0) & (stats.std_s > 0)
    out.status[cols[enough & ~varies]] = STATUS_CONSTANT
    ok = np.flatnonzero(enough & varies)
    if ok.size == 0:
        return

    theta0 = np.log(initial_parameters(mu[:, ok], ms[:, ok], _subset(stats, ok)))
    # Pad to the chunk width by repeating the first fittable gene: one compiled shape.
    pad = np.concatenate([ok, np.full(width - ok.size, ok[0])])
    data = (mu[:, pad], ms[:, pad], stats.weights[:, pad], stats.std_u[pad], stats.std_s[pad])
    theta0 = np.concatenate([theta0, np.repeat(theta0[:, :1], width - ok.size, axis=1)], axis=1)
    with jax.enable_x64(True):
        gene_data = GeneData(*(jnp.asarray(a, dtype=jnp.float64) for a in data), jnp.asarray(sample))
        state, trace = run_jit(gene_data, jnp.asarray(theta0, dtype=jnp.float64), config)
        theta = np.exp(np.asarray(state.theta))[:, : ok.size]
        t = np.asarray(state.t)[:, : ok.size]
        loss = np.asarray(state.loss)[: ok.size]
        trace = np.asarray(trace)[:, : ok.size]
        converged = np.asarray(state.converged)[: ok.size]
        n_iter = np.asarray(state.n_iter)[: ok.size]

    finite = np.all(np.isfinite(theta), axis=0) & np.all(np.isfinite(t), axis=0) & np.isfinite(loss)
    good, bad = ok[finite], ok[~finite]
    target = cols[good]
    out.alpha[target], out.beta[target], out.gamma[target], out.t_[target], out.scaling[target] = (
        theta[:, finite]
    )
    out.loss[target] = loss[finite]
    out.t[:, target] = t[:, finite]
    out.trace[:, target] = trace[:, finite]
    out.converged[target] = converged[finite]
    out.n_iter[target] = n_iter[finite]
    out.status[target] = STATUS_OK
    out.status[cols[bad]] = STATUS_NONFINITE


def _subset(stats, idx):
    return type(stats)(stats.weights[:, idx], stats.std_u[idx], stats.std_s[idx], stats.n_cells[idx])
