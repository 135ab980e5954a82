"""Cell weights, residual scales and scVelo's steady-state initialisation, for all genes at once.

Pure NumPy on the host: this runs once per gene chunk and needs per-gene quantiles, which
are cheap here and awkward inside ``jit``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Cells above this percentile of a gene's nonzero values are left out of the fit (scVelo: 99).
WEIGHT_PERCENTILE = 99.0
#: Extreme quantile of spliced used for the steady-state regression (scVelo: 98).
STEADY_PERCENTILE = 98.0
#: Smallest induction log-argument used to place the initial switch (keeps t_ finite).
_SWITCH_FLOOR = 1e-3
#: Fewest weighted cells with which a gene is fitted.
MIN_CELLS = 3


class GeneStatistics(NamedTuple):
    """Per-gene statistics the fit needs; arrays of shape ``(n_genes,)`` unless noted.

    Attributes
    ----------
    weights
        ``(n_cells, n_genes)`` boolean mask of the cells each gene is fitted on.
    std_u, std_s
        Standard deviations of observed ``Mu`` and ``Ms`` over the weighted cells.
    n_cells
        Number of weighted cells.
    bounds
        ``(2, n_genes)`` upper bounds of ``Mu`` and ``Ms`` of the weighted cells (their 99th
        percentiles over the cells where both are positive).
    """

    weights: np.ndarray
    std_u: np.ndarray
    std_s: np.ndarray
    n_cells: np.ndarray
    bounds: np.ndarray


def masked_quantile(x: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    """Per-column quantile of ``x`` over the rows where ``mask`` is true (linear interpolation).

    Parameters
    ----------
    x
        ``(n_cells, n_genes)`` values.
    mask
        ``(n_cells, n_genes)`` boolean selection.
    q
        Percentile in ``[0, 100]``.

    Returns
    -------
    ``(n_genes,)`` quantiles; ``nan`` for a column with no selected row.
    """
    count = mask.sum(axis=0)
    pos = (q / 100.0) * np.maximum(count - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
    cols = np.arange(x.shape[1])
    if q >= 50.0:
        # Rank from the top: only the few largest values of a column need ordering, so a
        # partition (linear time) and a sort of those replace a sort of every column.
        ordered = _smallest_sorted(_masked(x, mask, negate=True), np.max(count - 1 - lo, initial=0) + 1)
        low, high = -ordered[count - 1 - lo, cols], -ordered[np.maximum(count - 1 - hi, 0), cols]
    else:
        ordered = _smallest_sorted(_masked(x, mask, negate=False), np.max(hi, initial=0) + 1)
        low, high = ordered[lo, cols], ordered[hi, cols]
    with np.errstate(invalid="ignore"):
        # low + (high - low) * frac is exactly low when the two are tied (counts often are).
        value = np.where(high == low, low, low + (high - low) * (pos - lo))
    return np.where(count > 0, value, np.nan)


def _masked(x: np.ndarray, mask: np.ndarray, *, negate: bool) -> np.ndarray:
    """``np.where(mask, -x if negate else x, np.inf)`` in one new array (no temporary)."""
    if not negate:
        return np.where(mask, x, np.inf)
    out = np.where(mask, x, -np.inf)
    return np.negative(out, out=out)


def _smallest_sorted(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` smallest values of every column of ``x``, sorted: ``np.sort(x, axis=0)[:k]``.

    ``x`` is a temporary of the caller's and is partitioned in place (no second full copy).
    """
    k = min(max(k, 1), x.shape[0])
    if k < x.shape[0]:
        x.partition(k - 1, axis=0)
        x = x[:k]
    return np.sort(x, axis=0)


def fitting_cells(mu: np.ndarray, ms: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The cells each gene is fitted on: both moments positive and neither above its bound.

    Elementwise, so the mask does not depend on the arrays' memory layout.

    Parameters
    ----------
    mu, ms
        ``(n_cells, n_genes)`` unspliced and spliced moments.
    bounds
        ``(2, n_genes)`` upper bounds of ``Mu`` and ``Ms`` (:attr:`GeneStatistics.bounds`).

    Returns
    -------
    ``(n_cells, n_genes)`` boolean mask.
    """
    return (mu > 0) & (ms > 0) & (mu <= bounds[0]) & (ms <= bounds[1])


def gene_statistics(mu: np.ndarray, ms: np.ndarray) -> GeneStatistics:
    """Choose each gene's fitting cells and residual scales as scVelo does.

    A cell is used for a gene when both ``Mu`` and ``Ms`` are positive and neither exceeds
    the gene's 99th percentile over such cells (outliers are still assigned a time).

    Parameters
    ----------
    mu, ms
        ``(n_cells, n_genes)`` unspliced and spliced moments.

    Returns
    -------
    :class:`GeneStatistics`.
    """
    nonzero = (mu > 0) & (ms > 0)
    bounds = np.stack([masked_quantile(x, nonzero, WEIGHT_PERCENTILE) for x in (mu, ms)])
    weights = fitting_cells(mu, ms, bounds)
    n = weights.sum(axis=0)
    safe_n = np.maximum(n, 1)
    w = weights.astype(mu.dtype)

    def weighted_std(x):
        mean = (w * x).sum(axis=0) / safe_n
        return np.sqrt((w * (x - mean) ** 2).sum(axis=0) / safe_n)

    return GeneStatistics(weights, weighted_std(mu), weighted_std(ms), n, bounds)


def initial_parameters(mu: np.ndarray, ms: np.ndarray, stats: GeneStatistics) -> np.ndarray:
    """scVelo's steady-state initialisation, vectorised over genes.

    ``scaling = std_u / std_s``; ``gamma`` by regression through the origin of scaled
    unspliced on spliced over the cells in the top 2% of spliced (nudged by 1.2 towards the
    middle when extreme, as scVelo does); ``beta = 1``; ``alpha = mean scaled u`` of the top
    cells; ``t_`` the explicit induction time of the top cells' mean unspliced. scVelo's KDE
    bimodality test is not run (it costs more than the whole fit and rarely changes the
    start); the switch is kept finite by flooring the log argument at 1e-3.

    Parameters
    ----------
    mu, ms
        ``(n_cells, n_genes)`` unspliced and spliced moments.
    stats
        Output of :func:`gene_statistics`.

    Returns
    -------
    ``(5, n_genes)`` array of ``alpha, beta, gamma, t_, scaling``.
    """
    w = stats.weights > 0
    std_s = np.where(stats.std_s > 0, stats.std_s, 1.0)
    scaling = np.where((stats.std_u > 0) & (stats.std_s > 0), stats.std_u / std_s, 1.0)
    u = mu / scaling
    top_s = w & (ms >= masked_quantile(ms, w, STEADY_PERCENTILE))
    top_u = w & (u >= masked_quantile(u, w, STEADY_PERCENTILE))
    ss = (top_s * ms * ms).sum(axis=0)
    gamma = (top_s * u * ms).sum(axis=0) / np.where(ss > 0, ss, 1.0) + 1e-6
    gamma = np.where(gamma < 0.05 / scaling, gamma * 1.2, gamma)
    gamma = np.where(gamma > 1.5 / scaling, gamma / 1.2, gamma)
    top = top_u | top_s
    u_inf = (top * u).sum(axis=0) / np.maximum(top.sum(axis=0), 1)
    beta = np.ones_like(gamma)
    alpha = np.maximum(u_inf * beta, 1e-8)
    # alpha = u_inf * beta puts the top cells at the asymptote: floor the log at 1e-3.
    t_ = -np.log(_SWITCH_FLOOR) / beta
    return np.stack([alpha, beta, gamma, t_, scaling])
