"""Cell weights, residual scales and scVelo's steady-state initialisation, for all genes at once.

Pure NumPy on the host: this runs once per gene chunk and needs per-gene quantiles, which
are cheap here and awkward inside ``jit``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Cells above this percentile of a gene's nonzero values are left out of the fit (scVelo: 99).
WEIGHT_PERCENTILE = 99.0
#: A cell is within a bound (or at least at a quantile) up to this relative excess: values
#: tied at the bound stay together whatever rounding did to them (a 1e-13 relative
#: perturbation of pancreas_739's moments moved cells tied at the 99th percentile out of the
#: fit of 29 genes).
BOUND_RTOL = 1e-9
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

    Exactly ``np.percentile`` of each column's selected values (its default, linear method),
    without sorting whole columns: only the values on the near side of the quantile are
    ordered (:func:`_largest_sorted`).

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
        # Rank from the top: the (count - 1 - lo)-th largest value and the one above it.
        ordered = _largest_sorted(x, mask, count - lo)
        low, high = ordered[count - 1 - lo, cols], ordered[np.maximum(count - 1 - hi, 0), cols]
    else:
        ordered = -_largest_sorted(-x, mask, hi + 1)
        low, high = ordered[lo, cols], ordered[hi, cols]
    with np.errstate(invalid="ignore"):
        # low + (high - low) * frac is exactly low when the two are tied (counts often are).
        value = np.where(high == low, low, low + (high - low) * (pos - lo))
    return np.where(count > 0, value, np.nan)


#: Columns at least this long are searched through a subsample first (:func:`_largest_sorted`).
PREFILTER_ROWS = 4096
#: Every this many rows form the subsample.
_PREFILTER_STEP = 16


def _largest_sorted(x: np.ndarray, mask: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The ``k[j]`` largest selected values of every column ``j``, in decreasing order.

    Returns an array of at least ``max(k)`` rows whose column ``j`` starts with the
    ``k[j]`` largest of ``x[mask[:, j], j]`` (``k[j]`` no more than their number).

    On long columns, a threshold a little below each column's ``k``-th largest value is read
    from a subsample of the rows, and only the values from it up are ordered; a column
    whose threshold leaves fewer than ``k`` values, or more than an eighth of the rows
    (heavy ties), is ordered in full.
    The values are those of a full ordering either way. (A partition of whole columns was
    half of the first pass of a fit: 120 of 250 ms per chunk of 50,000 cells x 64 genes.)
    """
    n = x.shape[0]
    k_max = int(np.max(k, initial=1))
    if n < PREFILTER_ROWS or k_max > n // 8:
        return _largest_sorted_full(x, mask, k_max)
    # In the subsample each column's k-th largest lies near rank k / step: a margin of
    # half again and 8 ranks gives a threshold that keeps at least k values in almost
    # every column, and not many more (-inf, keeping every selected value, where the
    # subsample has fewer).
    margin = np.ceil(1.5 * k / _PREFILTER_STEP).astype(np.int64) + 8
    sub = _largest_sorted_full(x[::_PREFILTER_STEP], mask[::_PREFILTER_STEP], int(margin.max()) + 1)
    threshold = sub[np.minimum(margin, sub.shape[0] - 1), np.arange(x.shape[1])]
    kept = mask & (x >= threshold)
    n_kept = kept.sum(axis=0)
    fallback = np.flatnonzero((n_kept < k) | (n_kept > n // 8))
    kept[:, fallback] = False
    n_kept[fallback] = 0
    depth = max(k_max, int(n_kept.max(initial=0)))
    out = np.full((depth, x.shape[1]), -np.inf)
    # Selected positions column by column (nonzero of the transpose), each column's values
    # placed at its own rows of ``out``, then ordered.
    col, row = np.nonzero(kept.T)
    first = np.cumsum(n_kept) - n_kept
    out[np.arange(col.size) - first[col], col] = x[row, col]
    out.sort(axis=0)
    out = out[::-1]
    if fallback.size:
        full = _largest_sorted_full(x[:, fallback], mask[:, fallback], k_max)
        out[: full.shape[0], fallback] = full
        out[full.shape[0] :, fallback] = -np.inf
    return out


def _largest_sorted_full(x: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest selected values of every column, decreasing (unselected: ``-inf``)."""
    z = np.where(mask, x, -np.inf)
    np.negative(z, out=z)  # the k smallest of -x, by a partition (linear time) and a short sort
    k = min(max(k, 1), z.shape[0])
    if k < z.shape[0]:
        z.partition(k - 1, axis=0)
        z = z[:k]
    z = np.sort(z, axis=0)
    return np.negative(z, out=z)


def fitting_cells(mu: np.ndarray, ms: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The cells each gene is fitted on: both moments positive and neither above its bound.

    Elementwise, so the mask does not depend on the arrays' memory layout. "Above" allows
    :data:`BOUND_RTOL` of relative excess, so that rounding cannot split values tied at the
    bound.

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
    limit = bounds * (1.0 + BOUND_RTOL)
    return (mu > 0) & (ms > 0) & (mu <= limit[0]) & (ms <= limit[1])


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
    # (at or above the quantile, up to BOUND_RTOL: rounding cannot split values tied there)
    top_s = w & (ms >= masked_quantile(ms, w, STEADY_PERCENTILE) * (1.0 - BOUND_RTOL))
    top_u = w & (u >= masked_quantile(u, w, STEADY_PERCENTILE) * (1.0 - BOUND_RTOL))
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
