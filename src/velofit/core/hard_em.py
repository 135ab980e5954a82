"""Two-stage hard EM of MODEL.md section 4, for a chunk of genes at once, as pure functions.

The algorithm has optax's shape: :func:`init` builds an :class:`EMState`, :func:`step` maps
a state to the next one, and :func:`run` iterates the schedule (``n_explicit`` iterations
with the explicit E-step, then exact ones) inside ``lax.while_loop``, recording every gene's
loss per iteration. All arrays carry a gene axis; nothing loops over genes in Python.

Monotonicity: the M-step keeps only improving steps, and the E-step keeps, per cell, the
better of the proposed time and the previous one. So every gene's loss is non-increasing in
every iteration, including the explicit ones (whose closed-form times are not minimisers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .exact_time import exact_times, local_times
from .explicit_time import explicit_times
from .kinetics import KineticParams
from .mstep import GeneData, levenberg_marquardt, params_from_log, residuals

#: Repression is searched until both species have decayed to 1% of the switch state.
_REPRESSION_DECADES = jnp.log(100.0)


class EMConfig(NamedTuple):
    """Static settings of the hard EM.

    Attributes
    ----------
    max_iter
        Total EM iterations (explicit + exact).
    n_explicit
        Leading iterations that use the explicit E-step; the rest use the exact one. The
        default is exact throughout: on simulated data with known truth, explicit iterations
        led to optima of slightly lower loss but with worse rates and times, at no saving in
        time (``benchmarks/CLAIMS.md``, claims 1 and 2).
    n_lm
        Levenberg-Marquardt steps per M-step.
    n_jacobian_cells
        Most cells the EM iterates on (a seeded random subset is drawn by
        :func:`velofit.core.fit.fit_genes`; see :func:`run`); every cell is then timed exactly.
    tol
        A gene converges when an iteration lowers its loss by less than ``tol`` (relative).
    n_grid, n_newton
        Grid points per phase and Newton steps of the exact E-step.
    full_every
        Exact iterations search the whole trajectory (grid + Newton) in the first two
        iterations and then every ``full_every``-th; in between, each cell's time is refined
        from its previous one by Newton steps within its phase
        (:func:`~velofit.core.exact_time.local_times`), several times cheaper. ``1`` searches
        every time. Every fit ends with a full search (:func:`run`).
    """

    max_iter: int = 20
    n_explicit: int = 0
    n_lm: int = 2
    n_jacobian_cells: int = 1024
    tol: float = 1e-4
    n_grid: int = 32
    n_newton: int = 2
    full_every: int = 4


class EMState(NamedTuple):
    """State of the hard EM for a chunk of genes.

    Attributes
    ----------
    theta
        ``(5, n_genes)`` log-parameters ``log(alpha, beta, gamma, t_, scaling)``.
    t
        ``(n_cells, n_genes)`` absolute time of every cell on every gene's clock.
    loss
        ``(n_genes,)`` weighted sum of squared standardised residuals.
    damping
        ``(n_genes,)`` Levenberg-Marquardt damping.
    converged
        ``(n_genes,)`` whether the gene met the tolerance in the current stage.
    n_iter
        ``(n_genes,)`` iterations in which the gene was still updated.
    """

    theta: jnp.ndarray
    t: jnp.ndarray
    loss: jnp.ndarray
    damping: jnp.ndarray
    converged: jnp.ndarray
    n_iter: jnp.ndarray


def repression_length(params: KineticParams):
    """Longest repression time searched: until the slower species decays 100-fold."""
    return _REPRESSION_DECADES / jnp.minimum(params.beta, params.gamma)


def e_step(theta, t_prev, data: GeneData, exact, config: EMConfig, full=True):
    """Reassign every cell's time given the parameters, never worsening any cell.

    Parameters
    ----------
    theta
        ``(5, n_genes)`` log-parameters.
    t_prev
        ``(n_cells, n_genes)`` previous times, or ``None`` on the first E-step.
    data
        Observed data.
    exact
        Use the exact (grid + Newton) assignment instead of the explicit formula; a Python
        or a traced boolean (then both branches are compiled and one runs).
    config
        EM settings.
    full
        With ``exact``: search the whole trajectory (``True``) or refine ``t_prev`` within
        its phase (``False``, :func:`~velofit.core.exact_time.local_times`); Python or traced.

    Returns
    -------
    ``(t, loss)``: ``(n_cells, n_genes)`` absolute times and the ``(n_genes,)`` loss at them.
    """
    p = params_from_log(theta)
    u = data.mu / p.scaling
    std_u = data.std_u / p.scaling
    length = repression_length(p)

    def exact_branch():
        args = (u, data.ms, p, length, std_u, data.std_s, config.n_grid, config.n_newton)
        if t_prev is None or full is True:
            return exact_times(*args)
        return jax.lax.cond(full, lambda: exact_times(*args), lambda: local_times(t_prev, *args))

    def explicit_branch():
        return explicit_times(u, data.ms, p, length, std_u, data.std_s)

    if isinstance(exact, bool):
        t, dist = exact_branch() if exact else explicit_branch()
    else:
        t, dist = jax.lax.cond(exact, exact_branch, explicit_branch)
    if t_prev is not None:
        ru, rs = residuals(theta, t_prev, data)
        dist_prev = ru * ru + rs * rs
        better = dist <= dist_prev
        t = jnp.where(better, t, t_prev)
        dist = jnp.where(better, dist, dist_prev)
    return t, jnp.sum(data.weights * dist, axis=0)


def init(data: GeneData, theta0) -> EMState:
    """First state: the initial parameters and explicit times.

    Parameters
    ----------
    data
        Observed data.
    theta0
        ``(5, n_genes)`` initial log-parameters.

    Returns
    -------
    :class:`EMState`.
    """
    t, loss = e_step(theta0, None, data, exact=False, config=EMConfig())
    n_genes = theta0.shape[1]
    return EMState(
        theta=theta0,
        t=t,
        loss=loss,
        damping=jnp.full(n_genes, 1e-2, theta0.dtype),
        converged=jnp.zeros(n_genes, bool),
        n_iter=jnp.zeros(n_genes, jnp.int32),
    )


def step(state: EMState, data: GeneData, exact: bool, config: EMConfig, full=True) -> EMState:
    """One EM iteration (M-step, then E-step) on the genes that have not converged.

    Parameters
    ----------
    state
        Current state.
    data
        Observed data.
    exact
        Use the exact E-step (Python or traced boolean).
    config
        EM settings.
    full
        Full or local exact E-step (see :func:`e_step`).

    Returns
    -------
    The next :class:`EMState`; converged genes are carried over unchanged.
    """
    theta, damping, _ = levenberg_marquardt(
        state.theta, state.damping, state.loss, state.t, data, config.n_lm
    )
    t, loss = e_step(theta, state.t, data, exact, config, full)
    active = ~state.converged
    gain = (state.loss - loss) / jnp.maximum(state.loss, 1e-300)
    keep = active[None, :]
    return EMState(
        theta=jnp.where(keep, theta, state.theta),
        t=jnp.where(keep, t, state.t),
        loss=jnp.where(active, loss, state.loss),
        damping=jnp.where(active, damping, state.damping),
        converged=state.converged | (gain < config.tol),
        n_iter=state.n_iter + active.astype(jnp.int32),
    )


def run(data: GeneData, theta0, config: EMConfig):
    """Run the two-stage schedule to convergence or ``config.max_iter``, then time every cell.

    The EM iterates on the cells ``data.sample`` (all cells, or a seeded random subset of
    ``config.n_jacobian_cells`` on large data: five rates per gene are determined long before
    thousands of cells are used, while the cost of every iteration grows with the cells).
    A final full exact E-step then assigns every cell its time under the fitted parameters
    (after local E-steps, see ``config.full_every``, a cell may sit in a local optimum of
    the other phase), and the returned loss is over all cells (never above the last
    iteration's when all cells were iterated). scVelo iterates on all cells.

    Parameters
    ----------
    data
        Observed data.
    theta0
        ``(5, n_genes)`` initial log-parameters.
    config
        EM settings (static).

    Returns
    -------
    ``(state, trace)``: the final :class:`EMState` (its ``converged`` refers to the last
    stage; its ``t`` and ``loss`` cover all cells) and the ``(max_iter + 1, n_genes)`` loss
    per iteration on the iterated cells (``nan`` after a gene's last iteration).
    """
    n_cells, n_sample = data.mu.shape[0], data.sample.shape[0]
    if n_sample == n_cells:  # static shapes: the sample is every cell, in order
        state, trace = _iterate(data, theta0, config)
        t, loss = e_step(state.theta, state.t, data, True, config)
        return state._replace(t=t, loss=loss), trace
    rows = data.sample
    subset = GeneData(
        data.mu[rows], data.ms[rows], data.weights[rows], data.std_u, data.std_s,
        jnp.arange(n_sample, dtype=rows.dtype),
    )
    state, trace = _iterate(subset, theta0, config)
    t, loss = e_step(state.theta, None, data, True, config)
    return state._replace(t=t, loss=loss), trace


def _iterate(data: GeneData, theta0, config: EMConfig):
    """The EM loop of :func:`run` on the cells of ``data`` (every row is iterated)."""
    state = init(data, theta0)
    trace = jnp.full((config.max_iter + 1, theta0.shape[1]), jnp.nan, theta0.dtype)
    trace = trace.at[0].set(state.loss)
    n_explicit = min(config.n_explicit, config.max_iter)
    n_exact = config.max_iter - n_explicit

    def cond(carry):
        it, exact, n_exact_done, st, _ = carry
        stage_open = jnp.where(exact, n_exact_done < n_exact, it < n_explicit)
        return stage_open & ~(exact & jnp.all(st.converged))

    def body(carry):
        it, exact, n_exact_done, st, tr = carry
        active = ~st.converged
        # Exact throughout needs no branch: the explicit E-step is then compiled only for init.
        full = (n_exact_done < 2) | (n_exact_done % config.full_every == 0)
        st = step(st, data, True if n_explicit == 0 else exact, config, full)
        tr = tr.at[it + 1].set(jnp.where(active, st.loss, jnp.nan))
        it = it + 1
        n_exact_done = n_exact_done + exact.astype(jnp.int32)
        # Leave the explicit stage after n_explicit iterations or once every gene converged;
        # every gene then gets exact iterations until it converges again.
        switch = ~exact & (n_exact > 0) & ((it >= n_explicit) | jnp.all(st.converged))
        st = st._replace(converged=jnp.where(switch, False, st.converged))
        return it, exact | switch, n_exact_done, st, tr

    start_exact = jnp.asarray(n_explicit == 0)
    carry = (jnp.int32(0), start_exact, jnp.int32(0), state, trace)
    _, _, _, state, trace = jax.lax.while_loop(cond, body, carry)
    return state, trace


run_jit = jax.jit(run, static_argnames=("config",))
