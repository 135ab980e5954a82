"""Soft EM over a time grid with a learnable time prior, shared clock (MODEL.md section 5).

The model is a Gaussian mixture whose components lie on the kinetic curves: with grid times
``t_1..t_T`` on the shared clock (see :mod:`velofit.core.shared_time` for the parametrisation)
and prior weights ``pi_j``, cell ``i`` has density

    p(x_i) = sum_j pi_j prod_g N(x_u,ig; m_u,g(t_j), c_i var_u,g) N(x_s,ig; m_s,g(t_j), c_i var_s,g)

with per-gene, per-species variances ``var`` and (optionally, ``cell_noise=True``) a per-cell
noise factor ``c_i`` (geometric mean 1), which lets a cell that fits no time well keep a wide
posterior instead of a confidently wrong one.

Each iteration is a generalized EM step, so the log-likelihood ``sum_i log p(x_i)`` never
decreases (the trace is recorded):

* E: ``log q_ij = log pi_j - D_ij / (2 c_i) + const_i`` with ``D`` from
  :func:`~velofit.core.shared_time.grid_distances` (one matrix product per gene chunk).
* M, in blocks, each of which maximises or increases the expected complete log-likelihood
  ``Q`` given ``q``: ``c_i`` (closed form), then ``theta`` by Levenberg-Marquardt steps on
  ``sum_ij q_ij ||x_ig - m_g(t_j)||^2 / (c_i var_g)`` computed from per-grid-point sufficient
  statistics (``sum_i q_ij w / c_i``, ``sum_i q_ij w x / c_i``, and ``sum_i w x^2 / c_i``; so
  its cost does not grow with cells) and kept per gene only if that sum decreases (before
  them, :func:`switch_search` moves a gene's switch to the best of a few clock positions if that
  lowers the sum: the sum is flat in a switch beyond the clock's end), then ``var`` (closed
  form), then ``pi``: a step towards the smoothed Dirichlet-MAP target
  ``K (n_j + a) / (N + T a)`` (``n_j = sum_i q_ij``, ``a`` a pseudo-count, ``K`` a Gaussian
  kernel that keeps the prior from collapsing onto a few grid points), halved until it does
  not lower ``sum_j n_j log pi_j``. ``prior="uniform"`` keeps ``pi`` fixed.

``hard=True`` runs the classification variant (``q`` one-hot at each cell's best grid time,
the classification log-likelihood ``sum_i max_j log pi_j p(x_i | t_j)`` is then monotone).
The algorithm has optax's shape: :func:`init` -> :class:`SoftEMState`, :func:`step`, :func:`run`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .shared_time import (
    ALIGN_DIRECTIONS,
    FULL_DIRECTIONS,
    SharedData,
    cell_block,
    grid_distances,
    predict,
    refine_times,
    score_terms,
    upcast_chunk,
)

#: Largest change of each theta row in one LM step (log rates: a factor of e; t0: 0.2).
_STEP_CAP = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.2])
_LOG_2PI = float(np.log(2.0 * np.pi))
#: Step fractions tried for the prior update (the last, 0, keeps the prior).
_PRIOR_STEPS = np.array([2.0**-k for k in range(8)] + [0.0])
#: Forward-difference step of the LM Jacobian (theta units).
_FD_STEP = 1e-7
#: Relative curvature below which an LM direction counts as flat (forward-difference noise
#: of the Jacobian is ~1e-16 of the largest curvature).
_FLAT = 1e-12
#: Switch positions tried by :func:`switch_search`, as fractions of the way from a gene's
#: onset to the clock's end.
_SWITCH_FRACTIONS = np.linspace(0.05, 1.0, 20)
#: Genes per batch of the M-step (:func:`by_gene_batches`): its temporaries are ~0.4 MB per
#: gene at 200 grid points, so a batch holds ~100 MB, whatever the number of genes.
_M_STEP_GENES = 256
#: Size of one ``cells x grid`` float64 temporary of a block of the E-step.
_E_STEP_BLOCK_BYTES = 16 * 1024**2


class SoftEMConfig(NamedTuple):
    """Static settings of the soft EM.

    Attributes
    ----------
    max_iter
        Most EM iterations.
    tol
        Stop once an iteration raises the log-likelihood by less than ``tol * |loglik|``.
    n_lm
        Levenberg-Marquardt steps per M-step.
    prior
        ``"learned"`` or ``"uniform"`` (fixed).
    pseudocount
        Dirichlet pseudo-count of every grid point, as a fraction of ``n_cells / n_grid``.
    smoothing
        Standard deviation of the Gaussian kernel smoothing the prior target, in clock units
        (0: none).
    hard
        Classification EM (one-hot ``q``) instead of soft EM.
    cell_noise
        Learn the per-cell noise factor ``c_i`` (else ``c_i = 1``).
    mode
        ``"full"``: learn every gene parameter; ``"align"``: learn only each gene's clock
        speed and onset, keeping the kinetic shape of the initial parameters.
    min_var
        Smallest residual variance (standardised units).
    anneal_steps, anneal_start
        Deterministic annealing before the recorded iterations: ``anneal_steps`` soft
        iterations whose posterior is ``q ~ pi p^b`` with ``b`` rising geometrically from
        ``anneal_start`` to 1 (broad posteriors let cells cross low-likelihood gaps that the
        sharp posterior of many genes cannot); the log-likelihood trace starts after them.
    """

    max_iter: int = 50
    tol: float = 1e-7
    n_lm: int = 3
    prior: str = "learned"
    pseudocount: float = 0.1
    smoothing: float = 0.02
    hard: bool = False
    cell_noise: bool = True
    mode: str = "full"
    min_var: float = 1e-6
    anneal_steps: int = 0
    anneal_start: float = 1e-3


class _Settings(NamedTuple):
    """The settings of :class:`SoftEMConfig` as arrays, so that one compilation serves all."""

    learn_prior: jnp.ndarray
    hard: jnp.ndarray
    cell_noise: jnp.ndarray
    directions: jnp.ndarray
    kernel: jnp.ndarray
    pseudocount: jnp.ndarray
    tol: jnp.ndarray
    min_var: jnp.ndarray
    temper: jnp.ndarray
    search_switch: jnp.ndarray


def _settings(config: SoftEMConfig, grid) -> _Settings:
    if config.prior not in ("learned", "uniform"):
        raise ValueError(f"prior must be 'learned' or 'uniform', got {config.prior!r}")
    if config.mode not in ("full", "align"):
        raise ValueError(f"mode must be 'full' or 'align', got {config.mode!r}")
    directions = FULL_DIRECTIONS if config.mode == "full" else ALIGN_DIRECTIONS
    dtype = grid.dtype
    return _Settings(
        learn_prior=jnp.asarray(config.prior == "learned"),
        hard=jnp.asarray(bool(config.hard)),
        cell_noise=jnp.asarray(bool(config.cell_noise)),
        directions=jnp.asarray(directions, dtype),
        kernel=smoothing_kernel(grid, config.smoothing),
        pseudocount=jnp.asarray(config.pseudocount, dtype),
        tol=jnp.asarray(config.tol, dtype),
        min_var=jnp.asarray(config.min_var, dtype),
        temper=jnp.asarray(1.0, dtype),
        search_switch=jnp.asarray(config.mode == "full"),
    )


class SoftEMState(NamedTuple):
    """State of the soft EM.

    Attributes
    ----------
    theta
        ``(6, n_genes_padded)`` gene parameters on the shared clock.
    var_u, var_s
        ``(n_genes_padded,)`` residual variances (standardised units).
    log_pi
        ``(n_grid,)`` log prior weights of the grid times.
    cell_scale
        ``(n_cells,)`` per-cell noise factors ``c_i``.
    q
        ``(n_cells, n_grid)`` posterior at the current parameters.
    qd
        ``(n_cells,)`` ``sum_j q_ij D_ij`` at the current parameters.
    loglik
        Log-likelihood (classification log-likelihood if ``hard``) at the current parameters.
    damping
        ``(n_genes_padded,)`` Levenberg-Marquardt damping.
    n_iter
        Iterations run.
    """

    theta: jnp.ndarray
    var_u: jnp.ndarray
    var_s: jnp.ndarray
    log_pi: jnp.ndarray
    cell_scale: jnp.ndarray
    q: jnp.ndarray
    qd: jnp.ndarray
    loglik: jnp.ndarray
    damping: jnp.ndarray
    n_iter: jnp.ndarray


class GridStatistics(NamedTuple):
    """Sufficient statistics of the M-step.

    ``n``, ``su``, ``ss``: ``(n_grid, n_genes_padded)`` ``sum_i q_ij w_ig / c_i`` and the same
    with ``x_u``, ``x_s``. ``xx_u``, ``xx_s``: ``(n_genes_padded,)`` ``sum_i w x_u^2 / c_i``
    and ``sum_i w x_s^2 / c_i`` (every row of ``q`` sums to 1, so the second moments need no
    grid index: that saves two of the five cells x grid x genes products).
    """

    n: jnp.ndarray
    su: jnp.ndarray
    ss: jnp.ndarray
    xx_u: jnp.ndarray
    xx_s: jnp.ndarray


def e_step(theta, var_u, var_s, log_pi, cell_scale, data: SharedData, grid, hard: bool = False, temper=1.0):
    """Posterior over grid times and the log-likelihood.

    Computed in blocks of cells (:func:`_cells_per_block`), so that its ``cells x grid``
    temporaries (distances, joint log-density, softmax) are those of one block; only the
    posterior itself is ``n_cells x n_grid``.

    Parameters
    ----------
    theta, var_u, var_s, log_pi, cell_scale
        Current parameters (see :class:`SoftEMState`).
    data
        Chunked data.
    grid
        ``(n_grid,)`` clock times.
    hard
        One-hot posterior at the best grid time (classification likelihood); may be traced.
    temper
        Inverse temperature of the posterior, ``q ~ pi p^temper`` (annealing; the returned
        log-likelihood is always the untempered one).

    Returns
    -------
    ``(q, qd, loglik)``: ``(n_cells, n_grid)`` posterior, ``(n_cells,)`` ``sum_j q_ij D_ij``
    and the scalar (classification) log-likelihood of ``Mu, Ms``.
    """
    n_cells, n_grid = data.xu.shape[1], grid.shape[0]
    size = _cells_per_block(n_cells, n_grid)
    n_blocks = -(-n_cells // size)
    if n_blocks == 1:
        q, qd, per_cell = _e_step_block(theta, var_u, var_s, log_pi, cell_scale, data, grid, hard, temper)
        return q, qd, jnp.sum(per_cell)

    def one(b, carry):
        # The last block is moved back to end at the last cell; its rows that an earlier block
        # already computed get the same values again and are not counted twice.
        q, qd, total = carry
        start = jnp.minimum(b * size, n_cells - size)
        block = cell_block(data, start, size)
        scale = jax.lax.dynamic_slice_in_dim(cell_scale, start, size)
        q_b, qd_b, per_cell = _e_step_block(theta, var_u, var_s, log_pi, scale, block, grid, hard, temper)
        fresh = start + jnp.arange(size) >= b * size
        total = total + jnp.sum(jnp.where(fresh, per_cell, 0.0))
        q = jax.lax.dynamic_update_slice_in_dim(q, q_b, start, axis=0)
        qd = jax.lax.dynamic_update_slice_in_dim(qd, qd_b, start, axis=0)
        return q, qd, total

    dtype = data.std_u.dtype
    init = (jnp.zeros((n_cells, n_grid), dtype), jnp.zeros(n_cells, dtype), jnp.zeros((), dtype))
    return jax.lax.fori_loop(0, n_blocks, one, init)


def _cells_per_block(n_cells: int, n_grid: int) -> int:
    """Cells per block of the E-step: one ``cells x grid`` float64 array of about 16 MiB."""
    return max(1, min(n_cells, _E_STEP_BLOCK_BYTES // (8 * max(n_grid, 1))))


def _e_step_block(theta, var_u, var_s, log_pi, cell_scale, data: SharedData, grid, hard, temper):
    """:func:`e_step` on some cells: ``(q, qd, per-cell log-likelihood)``."""
    dist, log_det = grid_distances(theta, var_u, var_s, data, grid)
    c = cell_scale[:, None]
    log_norm = -0.5 * (data.n_cell * (_LOG_2PI + jnp.log(cell_scale)) + log_det) - data.log_jac
    joint = log_pi[None, :] - dist / (2.0 * c) + log_norm[:, None]
    tempered = log_pi[None, :] + temper * (joint - log_pi[None, :])
    soft_q = jax.nn.softmax(tempered, axis=1)
    hard_q = jax.nn.one_hot(jnp.argmax(joint, axis=1), grid.shape[0], dtype=dist.dtype)
    q = jnp.where(hard, hard_q, soft_q)
    per_cell = jnp.where(hard, jnp.max(joint, axis=1), jax.nn.logsumexp(joint, axis=1))
    return q, jnp.sum(q * dist, axis=1), per_cell


e_step_jit = jax.jit(e_step)


def grid_statistics(q, cell_scale, data: SharedData) -> GridStatistics:
    """Per-grid-point sufficient statistics of the M-step (one matrix product per chunk).

    Parameters
    ----------
    q
        ``(n_cells, n_grid)`` posterior.
    cell_scale
        ``(n_cells,)`` noise factors.
    data
        Chunked data.

    Returns
    -------
    :class:`GridStatistics`.
    """
    n_cells, n_grid = q.shape
    n_chunks, _, width = data.xu.shape
    size = _cells_per_block(n_cells, n_grid)
    inv_c = 1.0 / cell_scale

    def one(b, sums):
        # Block by block of cells, so that the weighted, transposed posterior is one block's;
        # rows of the last block that an earlier block counted get weight 0.
        start = jnp.minimum(b * size, n_cells - size)
        fresh = start + jnp.arange(size) >= b * size
        weight = jnp.where(fresh, jax.lax.dynamic_slice_in_dim(inv_c, start, size), 0.0)
        qc = (jax.lax.dynamic_slice_in_dim(q, start, size, axis=0) * weight[:, None]).T
        block = cell_block(data, start, size)

        def body(_, chunk):
            xu, xs, w = upcast_chunk(*chunk, qc)
            wu, ws = w * xu, w * xs
            return None, (qc @ jnp.concatenate([w, wu, ws], axis=1), weight @ jnp.concatenate([wu * xu, ws * xs], axis=1))

        first, second = jax.lax.scan(body, None, (block.xu, block.xs, block.w))[1]
        return sums[0] + first, sums[1] + second

    init = (jnp.zeros((n_chunks, n_grid, 3 * width), q.dtype), jnp.zeros((n_chunks, 2 * width), q.dtype))
    first, second = jax.lax.fori_loop(0, -(-n_cells // size), one, init)
    first = jnp.moveaxis(first.reshape(n_chunks, n_grid, 3, width), 0, 2).reshape(n_grid, 3, -1)
    second = jnp.moveaxis(second.reshape(n_chunks, 2, width), 0, 1).reshape(2, -1)
    return GridStatistics(first[:, 0], first[:, 1], first[:, 2], second[0], second[1])


def switch_search(theta, res, grid):
    """Move each gene's switch to the best of a few clock positions, if that lowers its loss.

    The loss is flat in ``log d`` while a gene's switch lies beyond the end of the clock (no
    cell is repressing), so a local step never brings a switch back once it has left; and a
    switch inside the clock can sit in a local minimum. The candidates put the switch at
    :data:`_SWITCH_FRACTIONS` of the way from the gene's onset (or the clock's start) to the
    clock's end, other parameters kept.

    Parameters
    ----------
    theta
        ``(6, n_genes)`` parameters.
    res
        Function of ``theta`` giving the grid residuals ``(r_u, r_s)``, each ``(n_grid, n_genes)``.
    grid
        Clock times.

    Returns
    -------
    ``theta`` with ``log d`` replaced where a candidate has a strictly lower loss.
    """
    def loss(th):
        ru, rs = res(th)
        return jnp.sum(ru * ru + rs * rs, axis=0)

    t0 = theta[5]
    start = jnp.clip(t0, grid[0], grid[-1])
    fractions = jnp.asarray(_SWITCH_FRACTIONS, theta.dtype)[:, None]
    switch = start + fractions * (grid[-1] - start)
    log_d = jnp.log(jnp.maximum(switch - t0, 1e-6 * (grid[-1] - grid[0])))  # (n_cand, genes)
    losses = jax.vmap(lambda ld: loss(theta.at[3].set(ld)))(log_d)
    best = jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf), axis=0)
    best_loss = jnp.take_along_axis(losses, best[None], axis=0)[0]
    better = jnp.isfinite(best_loss) & (best_loss < loss(theta))
    chosen = jnp.take_along_axis(log_d, best[None], axis=0)[0]
    return theta.at[3].set(jnp.where(better, chosen, theta[3]))


def levenberg_marquardt(theta, damping, stats: GridStatistics, var_u, var_s, std_u, std_s, grid, directions,
                        n_steps, search_switch=False):
    """LM steps on the expected weighted squared residual, from grid statistics only.

    The residuals are ``sqrt(n_j / var) (m(t_j) - xbar_j)`` at the grid points (``xbar_j`` the
    posterior-weighted mean observation), which differ from the expected loss by a constant.
    Steps move ``theta`` along the columns of ``directions``; the Jacobian is taken by forward
    differences (it only sets the step direction, so its ~1e-7 relative error is harmless, and
    it compiles several times faster than forward-mode AD of the kinetics). A step is kept per gene only
    if the loss decreases, so the expected complete log-likelihood never decreases.

    Parameters
    ----------
    theta, damping
        ``(6, n_genes_padded)`` parameters and ``(n_genes_padded,)`` damping.
    stats
        Sufficient statistics.
    var_u, var_s
        Residual variances.
    std_u, std_s
        Standardisation scales (:class:`~velofit.core.shared_time.SharedData`'s).
    grid
        Clock times.
    directions
        ``(6, n_free)`` matrix whose columns are the directions moved.
    n_steps
        Number of steps (static).
    search_switch
        First move each gene's switch by :func:`switch_search` (may be traced).

    Returns
    -------
    ``(theta, damping, e_u, e_s)``: new parameters and damping, and the expected weighted
    squared residuals ``sum_ij q_ij w (x - m(t_j))^2 / c_i`` per gene at the new ``theta``.
    """
    n = stats.n
    safe = jnp.where(n > 0, n, 1.0)
    mean_u, mean_s = stats.su / safe, stats.ss / safe
    root = jnp.sqrt(jnp.maximum(n, 0.0))
    wu, ws = root / jnp.sqrt(var_u), root / jnp.sqrt(var_s)

    def res(th):
        m_u, m_s = predict(th, grid[:, None], std_u, std_s)
        return wu * (m_u - mean_u), ws * (m_s - mean_s)

    theta = jnp.where(search_switch, switch_search(theta, res, grid), theta)
    n_free = directions.shape[1]
    eye = jnp.eye(n_free, dtype=theta.dtype)
    cap = jnp.asarray(_STEP_CAP, theta.dtype)[:, None]
    shifts = jnp.concatenate([jnp.zeros((1, 6), theta.dtype), directions.T]) * _FD_STEP

    def evaluate(th):
        """Residuals at th and their forward-difference Jacobian, one batched model call."""
        ru, rs = jax.vmap(lambda d: res(th + d[:, None]))(shifts)  # (1 + n_free, T, genes)
        return ru[0], rs[0], (ru[1:] - ru[0]) / _FD_STEP, (rs[1:] - rs[0]) / _FD_STEP

    def one(_, carry):
        # Evaluate the candidate; keep it per gene if it lowers the loss (the first pass
        # evaluates theta itself against an infinite loss); propose the next candidate.
        best, cand, damp = carry
        ru, rs, ju, js = evaluate(cand)
        c_loss = jnp.sum(ru * ru + rs * rs, axis=0)
        accept = jnp.isfinite(c_loss) & (c_loss < best[-1])
        first = jnp.isinf(best[-1])
        damp = jnp.where(first, damp, jnp.clip(jnp.where(accept, damp * 0.3, damp * 10.0), 1e-9, 1e9))
        best = tuple(jnp.where(accept, a, b) for a, b in zip((cand, ru, rs, ju, js, c_loss), best))
        th, ru, rs, ju, js, _ = best
        jtj = jnp.einsum("ptg,qtg->gpq", ju, ju) + jnp.einsum("ptg,qtg->gpq", js, js)
        jtr = jnp.einsum("ptg,tg->gp", ju, ru) + jnp.einsum("ptg,tg->gp", js, rs)
        diag = jnp.diagonal(jtj, axis1=1, axis2=2)
        # A direction whose curvature is below _FLAT of the gene's largest changes nothing but
        # rounding (e.g. log d of a gene that never switches on the clock): its forward
        # difference is noise, which a small damping would turn into a capped step that
        # shrinks every other direction's step with it. Such directions are not moved.
        largest = jnp.max(diag, axis=1, keepdims=True)
        moved = diag > _FLAT * largest
        jtj = jnp.where(moved[:, :, None] & moved[:, None, :], jtj, 0.0)
        jtr = jnp.where(moved, jtr, 0.0)
        scale = jnp.where(moved, jnp.maximum(diag, 1e-12 * (1.0 + largest)), 1.0)
        lhs = jtj + (damp[:, None] * scale)[:, :, None] * eye
        factor = jax.scipy.linalg.cho_factor(lhs)
        delta = directions @ jax.scipy.linalg.cho_solve(factor, -jtr[..., None])[..., 0].T
        ratio = jnp.max(jnp.abs(delta) / cap, axis=0)
        delta = delta * jnp.minimum(1.0, 1.0 / jnp.maximum(ratio, 1e-30))
        delta = jnp.where(jnp.all(jnp.isfinite(delta), axis=0), delta, 0.0)
        return best, th + delta, damp

    n_t, n_g = n.shape
    zeros_r = jnp.zeros((n_t, n_g), theta.dtype)
    zeros_j = jnp.zeros((n_free, n_t, n_g), theta.dtype)
    best = (theta, zeros_r, zeros_r, zeros_j, zeros_j, jnp.full(n_g, jnp.inf, theta.dtype))
    best, _, damping = jax.lax.fori_loop(0, n_steps + 1, one, (best, theta, damping))
    theta, ru, rs = best[:3]
    # Expected squared residuals = grid residuals^2 * var + the within-grid-point scatter.
    within_u = jnp.maximum(stats.xx_u - jnp.sum(stats.su * mean_u, axis=0), 0.0)
    within_s = jnp.maximum(stats.xx_s - jnp.sum(stats.ss * mean_s, axis=0), 0.0)
    e_u = jnp.sum(ru * ru, axis=0) * var_u + within_u
    e_s = jnp.sum(rs * rs, axis=0) * var_s + within_s
    return theta, damping, e_u, e_s


def by_gene_batches(fn, args, size: int):
    """``fn(*args)`` computed on batches of ``size`` genes one after another (inside ``jit``).

    For per-gene computations whose temporaries grow with the genes (the M-step holds a
    few dozen ``grid x genes`` arrays): a batch's are all that exist at once. The genes are
    padded to a multiple of ``size`` with copies of the last gene, whose results are dropped.

    Parameters
    ----------
    fn
        Function of arrays (or pytrees of arrays) whose last axis is the genes, returning such.
    args
        Its arguments, all with the same number of genes on their last axis.
    size
        Genes per batch (static).

    Returns
    -------
    ``fn(*args)``, assembled from the batches.
    """
    n_genes = jax.tree_util.tree_leaves(args)[0].shape[-1]
    if n_genes <= size:
        return fn(*args)
    n_batches = -(-n_genes // size)

    def split(a):
        pad = [(0, 0)] * (a.ndim - 1) + [(0, n_batches * size - n_genes)]
        a = jnp.pad(a, pad, mode="edge").reshape(a.shape[:-1] + (n_batches, size))
        return jnp.moveaxis(a, -2, 0)

    def join(a):
        a = jnp.moveaxis(a, 0, -2)
        return a.reshape(a.shape[:-2] + (n_batches * size,))[..., :n_genes]

    out = jax.lax.map(lambda batch: fn(*batch), jax.tree_util.tree_map(split, args))
    return jax.tree_util.tree_map(join, out)


def smoothing_kernel(grid, bandwidth: float):
    """``(n_grid, n_grid)`` column-stochastic Gaussian kernel (mass-preserving smoother)."""
    if bandwidth <= 0:
        return jnp.eye(grid.shape[0], dtype=grid.dtype)
    k = jnp.exp(-0.5 * ((grid[:, None] - grid[None, :]) / bandwidth) ** 2)
    return k / jnp.sum(k, axis=0, keepdims=True)


def prior_update(log_pi, q, kernel, pseudocount):
    """Move ``pi`` towards the smoothed Dirichlet-MAP target without lowering ``sum_j n_j log pi_j``.

    Parameters
    ----------
    log_pi
        ``(n_grid,)`` current log prior.
    q
        ``(n_cells, n_grid)`` posterior.
    kernel
        ``(n_grid, n_grid)`` smoothing kernel (:func:`smoothing_kernel`).
    pseudocount
        Dirichlet pseudo-count per grid point as a fraction of ``n_cells / n_grid``.

    Returns
    -------
    ``(n_grid,)`` new log prior.
    """
    n_cells, n_grid = q.shape
    counts = jnp.sum(q, axis=0)
    a = pseudocount * n_cells / n_grid
    target = kernel @ ((counts + a) / (n_cells + n_grid * a))
    pi = jnp.exp(log_pi)
    steps = jnp.asarray(_PRIOR_STEPS, q.dtype)[:, None]
    cands = pi[None, :] + steps * (target - pi)[None, :]
    value = jnp.sum(jnp.where(counts > 0, counts * jnp.log(jnp.maximum(cands, 1e-300)), 0.0), axis=1)
    first = jnp.argmax(value >= value[-1])  # largest step that does not lower Q (step 0 always does)
    new = cands[first]
    return jnp.log(new / jnp.sum(new))


def init(data: SharedData, grid, theta, var_u, var_s, config: SoftEMConfig, log_pi=None, cell_scale=None) -> SoftEMState:
    """First state: the given parameters, a uniform prior (unless given) and their E-step.

    Parameters
    ----------
    data
        Chunked data.
    grid
        ``(n_grid,)`` clock times.
    theta, var_u, var_s
        Initial gene parameters and variances.
    config
        Settings.
    log_pi, cell_scale
        Optional initial log prior and per-cell noise factors.

    Returns
    -------
    :class:`SoftEMState`.
    """
    return _init(data, grid, theta, var_u, var_s, _settings(config, grid), log_pi, cell_scale)


def _init(data, grid, theta, var_u, var_s, settings: _Settings, log_pi, cell_scale) -> SoftEMState:
    n_cells, n_grid = data.xu.shape[1], grid.shape[0]
    if log_pi is None:
        log_pi = jnp.full(n_grid, -jnp.log(n_grid), grid.dtype)
    if cell_scale is None:
        cell_scale = jnp.ones(n_cells, grid.dtype)
    q, qd, loglik = e_step_jit(theta, var_u, var_s, log_pi, cell_scale, data, grid, settings.hard, settings.temper)
    damping = jnp.full(theta.shape[1], 1e-2, theta.dtype)
    return SoftEMState(theta, var_u, var_s, log_pi, cell_scale, q, qd, loglik, damping, jnp.int32(0))


def step(state: SoftEMState, data: SharedData, grid, config: SoftEMConfig) -> SoftEMState:
    """One generalized EM iteration (M-step blocks from the stored posterior, then E-step).

    Parameters
    ----------
    state
        Current state (its ``q`` is the posterior at its parameters).
    data
        Chunked data.
    grid
        Clock times.
    config
        Settings.

    Returns
    -------
    The next :class:`SoftEMState`; its ``loglik`` is ``>=`` the input's up to rounding. Jitted
    (compiled once per array shape and ``n_lm``).
    """
    return _step_jit(state, data, grid, _settings(config, grid), config.n_lm)


def _step(state: SoftEMState, data: SharedData, grid, settings: _Settings, n_lm: int) -> SoftEMState:
    var_u, var_s, c = state.var_u, state.var_s, state.cell_scale
    # Block 1, per-cell noise: c_i = sum_j q_ij D_ij / n_i maximises Q; then rescale so that the
    # geometric mean of c is 1 (c / k and var * k give the same likelihood).
    has = data.n_cell > 0
    new_c = jnp.where(has, jnp.maximum(state.qd / jnp.where(has, data.n_cell, 1.0), 1e-8), 1.0)
    k = jnp.exp(jnp.sum(jnp.where(has, jnp.log(new_c), 0.0)) / jnp.maximum(jnp.sum(has), 1))
    k = jnp.where(settings.cell_noise, k, 1.0)
    c = jnp.where(settings.cell_noise, new_c / k, c)
    var_u, var_s = var_u * k, var_s * k
    # Block 2, gene parameters: LM on the grid statistics, improving steps only.
    stats = grid_statistics(state.q, c, data)
    lm = lambda th, damp, st_, vu, vs, su, ss: levenberg_marquardt(
        th, damp, st_, vu, vs, su, ss, grid, settings.directions, n_lm, settings.search_switch
    )
    theta, damping, e_u, e_s = by_gene_batches(
        lm, (state.theta, state.damping, stats, var_u, var_s, data.std_u, data.std_s), _M_STEP_GENES
    )
    # Block 3, variances in closed form given theta.
    used = data.n_gene > 0
    safe = jnp.where(used, data.n_gene, 1.0)
    var_u = jnp.where(used, jnp.maximum(e_u / safe, settings.min_var), 1.0)
    var_s = jnp.where(used, jnp.maximum(e_s / safe, settings.min_var), 1.0)
    # Block 4, the prior.
    learned = prior_update(state.log_pi, state.q, settings.kernel, settings.pseudocount)
    log_pi = jnp.where(settings.learn_prior, learned, state.log_pi)
    q, qd, loglik = e_step(theta, var_u, var_s, log_pi, c, data, grid, settings.hard, settings.temper)
    return SoftEMState(theta, var_u, var_s, log_pi, c, q, qd, loglik, damping, state.n_iter + 1)


def run(data: SharedData, grid, theta, var_u, var_s, config: SoftEMConfig, log_pi=None, cell_scale=None,
        progress=None):
    """Iterate :func:`step` until the log-likelihood gain is below ``tol`` or ``max_iter``.

    The step is jitted once per array shape and ``n_lm`` (every other setting is passed as an
    array), and the loop runs on the host, so changing settings never recompiles.

    Parameters
    ----------
    data, grid, theta, var_u, var_s, config, log_pi, cell_scale
        As for :func:`init`.
    progress
        Called with ``1`` after every annealing step and every iteration (for a progress
        bar); ``None``: nothing is reported.

    Returns
    -------
    ``(state, trace)``: the final :class:`SoftEMState` and the ``(max_iter + 1,)`` NumPy
    log-likelihood per iteration (``nan`` after the last).
    """
    settings = _settings(config, grid)
    if config.anneal_steps > 0:
        soft = settings._replace(hard=jnp.asarray(False))
        temper = np.geomspace(config.anneal_start, 1.0, config.anneal_steps + 1)[:-1]
        state = _init(data, grid, theta, var_u, var_s, soft._replace(temper=jnp.asarray(temper[0])), log_pi, cell_scale)
        for b in temper[1:]:
            state = _step_jit(state, data, grid, soft._replace(temper=jnp.asarray(b, grid.dtype)), config.n_lm)
            _report(progress)
        state = _step_jit(state, data, grid, soft, config.n_lm)
        _report(progress)
        theta, var_u, var_s, log_pi, cell_scale = state.theta, state.var_u, state.var_s, state.log_pi, state.cell_scale
    state = _init(data, grid, theta, var_u, var_s, settings, log_pi, cell_scale)
    trace = np.full(config.max_iter + 1, np.nan)
    trace[0] = float(state.loglik)
    for it in range(1, config.max_iter + 1):
        state = _step_jit(state, data, grid, settings, config.n_lm)
        trace[it] = float(state.loglik)
        _report(progress)
        if trace[it] - trace[it - 1] <= config.tol * abs(trace[it]):
            break
    return state, trace


_step_jit = jax.jit(_step, static_argnames=("n_lm",))


def _report(progress) -> None:
    if progress is not None:
        progress(1)


def posterior_moments(q, grid):
    """Posterior mean and standard deviation of every cell's time.

    Parameters
    ----------
    q
        ``(n_cells, n_grid)`` posterior (rows sum to 1).
    grid
        ``(n_grid,)`` clock times.

    Returns
    -------
    ``(mean, std)``, each ``(n_cells,)``.
    """
    mean = q @ grid
    var = q @ (grid * grid) - mean * mean
    return mean, jnp.sqrt(jnp.maximum(var, 0.0))


def posterior_spread(state: SoftEMState, data: SharedData, grid):
    """Posterior mean and spread of every cell's time, neither rounded nor floored by the grid.

    The mean is the posterior's, except where the posterior is narrower than a grid step
    (most cells, with many genes): the posterior mean there is the grid point holding the
    mass, and cells of a cluster would share a handful of values. Those cells get the
    continuous minimiser of their summed residual ``f`` within one grid step of that mean
    (:func:`~velofit.core.shared_time.refine_times`): the mode of the cell's likelihood, which
    the Laplace approximation takes as its mean (the prior, defined on the grid, is not
    interpolated between grid points).

    The spread is the largest of three standard deviations:

    - the grid one of the posterior ``q`` (0 when it is narrower than a grid step, as it
      often is with many genes);
    - the Laplace one, ``sqrt(2 c_i / f''(mean))``, with ``f`` the cell's summed weighted
      squared residual (:func:`~velofit.core.shared_time.shared_times`) and ``c_i`` its noise
      factor;
    - the sandwich (robust) one, ``sqrt(sum_g f_g'^2) / f''`` over the genes ``g``
      (:func:`~velofit.core.shared_time.score_terms`). The first two trust the model's
      independent Gaussian noise; on real data, where neighbouring-cell smoothing makes the
      genes' errors shared, they are far too narrow, and the sandwich one widens the spread
      where the genes disagree about the cell's time.

    Parameters
    ----------
    state
        A :class:`SoftEMState` (its ``q`` and parameters).
    data
        Chunked data.
    grid
        ``(n_grid,)`` clock times.

    Returns
    -------
    ``(mean, std)``, each ``(n_cells,)``.
    """
    mean, std = posterior_moments(state.q, grid)
    spacing = (grid[-1] - grid[0]) / (grid.shape[0] - 1)
    lo, hi = jnp.maximum(mean - spacing, grid[0]), jnp.minimum(mean + spacing, grid[-1])
    refined, _ = refine_times(mean, state.theta, state.var_u, state.var_s, data, lo, hi, 0.5 * spacing, n_newton=3)
    mean = jnp.where(std < spacing, refined, mean)
    h, s2 = score_terms(mean, state.theta, state.var_u, state.var_s, data)
    curved = h > 0
    safe_h = jnp.where(curved, h, 1.0)
    laplace = jnp.where(curved, 2.0 * state.cell_scale / safe_h, 0.0)
    sandwich = jnp.where(curved, s2 / (safe_h * safe_h), 0.0)
    return mean, jnp.sqrt(jnp.maximum(std * std, jnp.maximum(laplace, sandwich)))


posterior_spread_jit = jax.jit(posterior_spread)

