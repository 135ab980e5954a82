"""Per-gene cell times under a learned time prior (MODEL.md section 5, on each gene's own clock).

The hard EM (:mod:`velofit.core.hard_em`) gives every cell the *nearest* point of each gene's
curve. Under noise that estimate ignores how cells are spread along the curve: a cell near
the origin is as close to the first moments of induction as to the end of a long repression
tail, and the nearest point picks whichever is a hair closer. With the fitted parameters held,
this module learns each gene's distribution of cells over time and lets it break such
choices:

1. A grid of ``n_grid`` times per phase (:func:`grid_times`) and, per gene, a Gaussian mixture
   whose components are the curve's points at the grid times, with the variance of the hard
   EM's last iteration (``sigma^2 = loss / (2 n)`` per species over its iterated cells, in
   units of the residual scales) and weights
   ``pi_j``: the time prior. :func:`learn_prior` fits ``pi`` by EM on a subset of cells
   (``pi_j <- mean_i q_ij``, smoothed along each phase and floored so that no time becomes
   impossible), starting from a prior uniform in time. The component likelihoods do not
   change while ``pi`` is learned, so each iteration is two matrix-vector products per gene
   (in float32).
2. In each phase, every cell takes the grid time of highest posterior
   ``pi_j N(x_i; mu(t_j), sigma^2)`` (the EM's own grid search, with the penalty
   ``-2 sigma^2 log pi_j`` added to each grid point's distance) and is refined by Newton
   steps on the distance to the curve; the phase of higher posterior wins
   (:func:`prior_penalty`, :func:`~velofit.core.exact_time.exact_times`): the time is the
   nearest point within the branch of the curve the prior chose. The fit runs this search
   in its own compiled program (:func:`velofit.core.hard_em.fit_step`'s last pass, given the
   penalty of :func:`learn_penalties`).

With a prior uniform in time and a small ``sigma`` this is the nearest point again; the
learned prior only changes which branch a cell is put on where the data cannot tell, and
the change is measured, not assumed (``benchmarks/noise_sweep.py``: on scVelo's simulator,
2,000 x 200, median per-gene Spearman of ``fit_t`` with the true time 0.865 -> 0.887 at noise
level 1, 0.975 -> 0.989 at 0.3, 0.9966 -> 0.9987 at 0.1; scVelo 0.873, 0.986, 0.998). It
replaces the fit's nearest-point pass over all cells and costs a few percent of the fit.
The kinetic parameters are those of the hard EM: this step only reads them.
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from .._io import padded_columns
from .compile_cache import compiled
from .hard_em import repression_length
from .kinetics import KineticParams, trajectory
from .mstep import params_from_log

#: Prior mass spread evenly over the grid at every update (no grid time becomes impossible).
PRIOR_FLOOR = 1e-4
#: EM iterations of the prior. It is learned on the EM's grid (``EMConfig.n_grid``): on
#: scVelo's simulator (2,000 x 200, noise level 1) 32 points with 10 iterations and 50 with 30
#: gave a median time Spearman of 0.8875 and 0.8851 (nearest points: 0.865); 50 points with 10
#: iterations 0.8846.
N_ITER = 10
#: Standard deviation, in grid points, of the smoothing of the prior's counts.
SMOOTHING = 1.0
#: Genes of one call of the prior's program: its ``(genes, 1,024 cells, 2 n_grid)`` float64
#: arrays stay at about 52 MB, whatever the chunk width.
GROUP_GENES = 64
#: Smallest variance used (a noise-free fit has loss 0: its posterior is its nearest point).
_MIN_VARIANCE = 1e-30


def grid_times(params: KineticParams, tau_max, n_grid: int):
    """Absolute grid times of both phases, the grid of :func:`~velofit.core.exact_time.exact_times`.

    Induction ``k * t_ / (n_grid - 1)`` and repression ``t_ + k * tau_max / (n_grid - 1)`` for
    ``k = 0 .. n_grid - 1`` (the switch is on both: the end of one phase, the start of the
    other).

    Parameters
    ----------
    params
        Kinetic parameters of shape ``(n_genes,)``.
    tau_max
        ``(n_genes,)`` longest repression time.
    n_grid
        Grid points per phase (static, at least 2).

    Returns
    -------
    ``(times, spacing)``: ``(2 * n_grid, n_genes)`` grid times, induction first, and their
    ``(2 * n_grid, n_genes)`` spacing (the time each grid point stands for).
    """
    k = jnp.arange(n_grid, dtype=params.t_.dtype)[:, None] / (n_grid - 1)
    ones = jnp.ones((n_grid, 1), dtype=params.t_.dtype)
    times = jnp.concatenate([k * params.t_, params.t_ + k * tau_max])
    spacing = jnp.concatenate([ones * (params.t_ / (n_grid - 1)), ones * (tau_max / (n_grid - 1))])
    return times, spacing


@lru_cache(maxsize=8)
def smoothing_matrix(n_grid: int, width: float) -> np.ndarray:
    """``(2 n_grid, 2 n_grid)`` Gaussian smoothing of grid counts within each phase, mass-preserving.

    Parameters
    ----------
    n_grid
        Grid points per phase.
    width
        Standard deviation of the kernel in grid points (``0``: no smoothing).

    Returns
    -------
    Block-diagonal matrix ``S`` whose columns sum to 1: ``S @ n`` spreads every grid point's
    count over its neighbours in the same phase.
    """
    k = np.arange(n_grid)
    if width > 0:
        block = np.exp(-0.5 * ((k[:, None] - k[None, :]) / width) ** 2)
    else:
        block = np.eye(n_grid)
    block /= block.sum(axis=0, keepdims=True)
    out = np.zeros((2 * n_grid, 2 * n_grid))
    out[:n_grid, :n_grid] = block
    out[n_grid:, n_grid:] = block
    return out


def _grid_distances(u, s, params: KineticParams, tau_max, std_u, std_s, n_grid: int):
    """``(n_genes, n_cells, 2 n_grid)`` squared scaled distances of every cell to every grid point,
    and the grid's spacing (:func:`grid_times`)."""
    times, spacing = grid_times(params, tau_max, n_grid)
    grid_u, grid_s = trajectory(times, params)
    su, ss = (u / std_u).T[:, :, None], (s / std_s).T[:, :, None]
    gu, gs = (grid_u / std_u).T[:, None, :], (grid_s / std_s).T[:, None, :]
    return (su - gu) ** 2 + (ss - gs) ** 2, spacing


def learn_prior(u, s, params: KineticParams, tau_max, std_u, std_s, variance, *, n_grid: int,
                n_iter: int, smoothing):
    """Fit each gene's time prior on the grid by EM, the curve and its variance held.

    Parameters
    ----------
    u, s
        ``(n_cells, n_genes)`` scaled unspliced (``Mu / scaling``) and spliced abundance.
    params
        Kinetic parameters of shape ``(n_genes,)``.
    tau_max
        ``(n_genes,)`` longest repression time.
    std_u, std_s
        ``(n_genes,)`` residual scales of scaled unspliced and spliced.
    variance
        ``(n_genes,)`` residual variance per species, in units of those scales.
    n_grid, n_iter
        Grid points per phase and EM iterations (static).
    smoothing
        ``(2 n_grid, 2 n_grid)`` matrix from :func:`smoothing_matrix`.

    Returns
    -------
    ``(2 n_grid, n_genes)`` log prior weights (each column sums to 1 in probability).
    """
    dist, spacing = _grid_distances(u, s, params, tau_max, std_u, std_s, n_grid)
    scale = 2.0 * jnp.maximum(variance, _MIN_VARIANCE)[:, None, None]
    # Relative to each cell's best grid point (its largest term is 1: no underflow of the sums).
    # Float32 from here: the likelihoods lie in (0, 1] and the prior's weights are sums of
    # 1,024 of them; the EM on them needs no more digits than the prior's smoothing keeps.
    lik = jnp.exp(-(dist - jnp.min(dist, axis=-1, keepdims=True)) / scale).astype(jnp.float32)
    size = 2 * n_grid
    smoothing_t = jnp.asarray(smoothing, jnp.float32).T

    def update(_, prior):  # prior: (genes, 2 n_grid)
        evidence = jnp.sum(lik * prior[:, None, :], axis=-1)
        counts = prior * jnp.sum(lik / evidence[:, :, None], axis=1)
        smoothed = counts @ smoothing_t
        new = smoothed / jnp.sum(smoothed, axis=1, keepdims=True)
        return (1.0 - PRIOR_FLOOR) * new + PRIOR_FLOOR / size

    uniform = (spacing / jnp.sum(spacing, axis=0)).T.astype(jnp.float32)
    prior = jax.lax.fori_loop(0, n_iter, update, uniform)
    return jnp.log(prior.astype(dist.dtype)).T


def prior_penalty(variance, log_prior):
    """The exact search's grid penalty under a learned prior: ``-2 sigma^2 log pi_j``.

    With it, :func:`~velofit.core.exact_time.exact_times` finds each phase's MAP grid point
    (distance plus penalty), refines it by Newton steps on the distance alone (the nearest
    point of that branch of the curve) and keeps the phase of higher posterior.

    Parameters
    ----------
    variance
        ``(n_genes,)`` residual variance per species (floored at a tiny positive value).
    log_prior
        ``(2 n_grid, n_genes)`` from :func:`learn_prior`.

    Returns
    -------
    ``(2, n_grid, n_genes)`` non-negative penalty, induction first.
    """
    n_genes = log_prior.shape[-1]
    penalty = -2.0 * jnp.maximum(variance, _MIN_VARIANCE) * log_prior
    return penalty.reshape(2, -1, n_genes)


@partial(jax.jit, static_argnames=("n_grid", "n_iter"))
def _learn_penalty_jit(theta, mu, ms, std_u, std_s, variance, smoothing, *, n_grid, n_iter):
    p = params_from_log(theta)
    log_prior = learn_prior(mu / p.scaling, ms, p, repression_length(p), std_u / p.scaling, std_s, variance,
                            n_grid=n_grid, n_iter=n_iter, smoothing=smoothing)
    return prior_penalty(variance, log_prior)


def learn_penalties(theta: np.ndarray, arrays: tuple[np.ndarray, np.ndarray], genes: np.ndarray, std_u: np.ndarray,
                    std_s: np.ndarray, variance: np.ndarray, sample: np.ndarray, device: jax.Device, width: int,
                    n_grid: int) -> np.ndarray:
    """Learn each fitted gene's time prior and return the grid penalty that times cells under it.

    The fit then times every cell with its own compiled program, given this penalty
    (:func:`velofit.core.hard_em.fit_step`'s ``final`` branch).

    Parameters
    ----------
    theta
        ``(5, n_genes)`` fitted log-parameters.
    arrays
        ``(mu, ms)``: ``(n_cells, k)`` moments, read at columns ``genes`` and rows ``sample``.
    genes
        ``(n_genes,)`` sorted positions of the fitted genes in ``arrays``.
    std_u, std_s
        ``(n_genes,)`` residual scales of ``Mu`` and ``Ms``.
    variance
        ``(n_genes,)`` residual variance per species of the hard fit (in units of the
        residual scales): its loss over twice its number of fitted cells.
    sample
        Sorted rows of the cells the prior is learned on (the EM's iterated cells), all of
        them: cells a gene is not fitted on (zeros near the origin, the top percentile) lie
        on its trajectory too. (With only the fitted cells the prior missed the cells at the
        end of repression: on scVelo's simulator at noise level 0.1, the median time
        Spearman fell from 0.9966 to 0.9949; with all, it stays 0.9966.)
    device
        Device to run on.
    width
        The fit's compiled chunk width: the prior is learned on ``min(width, GROUP_GENES)``
        genes at a time (padded by repeating the first), one shape however many of a chunk's
        genes were fitted, so that a gene's prior does not depend on its neighbours, bitwise.
    n_grid
        Grid points per phase (the EM's ``n_grid``: the penalty is laid on its search's grid).

    Returns
    -------
    ``(2, n_grid, n_genes)`` float64 penalty (:func:`prior_penalty`).
    """
    mu, ms = arrays
    n_genes = genes.size
    smoothing = jax.device_put(smoothing_matrix(n_grid, SMOOTHING), device)
    out = np.empty((2, n_grid, n_genes))
    width = min(GROUP_GENES, width)
    sampled = [np.asarray(a[sample], np.float64) for a in (mu, ms)]  # once, not per group of genes
    for start in range(0, n_genes, width):
        cols = np.arange(start, min(start + width, n_genes))
        per_gene = [padded_columns(np.asarray(a, np.float64), cols, width) for a in (theta, std_u, std_s, variance)]
        rows = [padded_columns(a, genes[cols], width) for a in sampled]
        args = jax.device_put((per_gene[0], *rows, *per_gene[1:]), device) + (smoothing,)
        learn = compiled(_learn_penalty_jit, args, static={"n_grid": n_grid, "n_iter": N_ITER}, device=device)
        out[:, :, cols] = np.asarray(learn(*args))[:, :, : cols.size]
    return out
