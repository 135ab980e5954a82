"""Two-stage hard EM of MODEL.md section 4, for a chunk of genes at once, as pure functions.

The algorithm has optax's shape: :func:`init` builds an :class:`EMState`, :func:`step` maps
a state to the next one, and :func:`advance` iterates the schedule (``n_explicit``
iterations with the explicit E-step, then exact ones) inside ``lax.while_loop``, a few
iterations per call, recording every gene's loss per iteration; :func:`fit_step` is the one
compiled program of the per-gene fit. All arrays carry a gene axis; nothing loops over genes in Python.

Monotonicity: the M-step keeps only improving steps (with the times it moved), and the
E-step keeps, per cell, the better of the proposed time and the M-step's one. So every
gene's loss is non-increasing in every iteration, including the explicit ones (whose
closed-form times are not minimisers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .buffers import evaluate_once
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
        Levenberg-Marquardt steps per M-step (one Jacobian per two steps:
        :func:`~velofit.core.mstep.levenberg_marquardt`).
    move_times
        M-steps try the projected step, which moves each cell's time with the parameters
        (:func:`~velofit.core.mstep.levenberg_marquardt`), before the plain one with times
        held. ``False`` is the plain alternation, which crawls where the parameters and the
        times must move together (on scVelo's simulator at 2,000 x 200 it left gamma/beta
        3.5-7.5x further from the truth at noise levels 0.1-0.3).
    n_jacobian_cells
        Most cells the EM iterates on (a seeded random subset is drawn by
        :func:`velofit.core.fit.fit_genes`: five rates per gene are determined long before
        thousands of cells are used, while every iteration's cost grows with the cells;
        scVelo iterates on all cells); every cell is then timed exactly (:func:`assign_times`).
    tol
        A gene converges when an iteration lowers its loss by less than ``tol`` (relative).
    n_grid, n_newton
        Grid points per phase and Newton steps of the exact E-step.
    full_every
        Exact iterations search the whole trajectory (grid + Newton) in the first two
        iterations and then every ``full_every``-th; in between, each cell's time is refined
        from its previous one by Newton steps within its phase
        (:func:`~velofit.core.exact_time.local_times`), several times cheaper. ``1`` searches
        every time. Every fit ends with a full search (:func:`assign_times`).
    time_prior
        After the fit, time every cell under each gene's learned time prior
        (:mod:`velofit.core.time_prior`: the nearest point within the branch of the curve
        the prior's posterior chooses) instead of at its nearest point. The
        parameters are the hard EM's either way; the loss is then the sum at those times.
    """

    max_iter: int = 20
    n_explicit: int = 0
    n_lm: int = 2
    move_times: bool = True
    n_jacobian_cells: int = 1024
    tol: float = 1e-3
    n_grid: int = 32
    n_newton: int = 2
    full_every: int = 4
    time_prior: bool = True


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
        ``(2, n_genes)`` Levenberg-Marquardt damping of the M-step's plain and projected steps.
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


def e_step(theta, t_prev, data: GeneData, exact, config: EMConfig, full=True, penalty=None):
    """Reassign every cell's time given the parameters, never worsening any cell.

    Parameters
    ----------
    theta
        ``(5, n_genes)`` log-parameters.
    t_prev
        ``(n_cells, n_genes)`` previous times (``nan`` where a cell has none), or ``None``
        on the first E-step.
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
    penalty
        Optional ``(2, config.n_grid, n_genes)`` penalty of every grid point of the full
        exact search (:func:`~velofit.core.exact_time.exact_times`; the learned time prior's,
        :func:`velofit.core.time_prior.prior_penalty`); ``None`` or zeros: the nearest point.

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
            return exact_times(*args, penalty=penalty)
        return jax.lax.cond(full, lambda: exact_times(*args, penalty=penalty), lambda: local_times(t_prev, *args))

    def explicit_branch():
        return explicit_times(u, data.ms, p, length, std_u, data.std_s)

    if isinstance(exact, bool):
        t, dist = exact_branch() if exact else explicit_branch()
    else:
        t, dist = jax.lax.cond(exact, exact_branch, explicit_branch)
    if t_prev is not None:
        # Read by the choice of time and of distance: computed once (velofit.core.buffers);
        # not at all where no cell has a previous time (the blocks of the final assignment
        # without iterated cells).
        dist_prev = evaluate_once(_squared_residuals, theta, t_prev, data, when=jnp.any(~jnp.isnan(t_prev)),
                                  otherwise=jnp.nan)
        # A previous time wins only where it is strictly nearer (a NaN previous time never does).
        keep = (dist_prev < dist) | jnp.isnan(dist)
        t = jnp.where(keep, t_prev, t)
        dist = jnp.where(keep, dist_prev, dist)
    return t, jnp.sum(data.weights * dist, axis=0)


def _squared_residuals(theta, t, data: GeneData):
    """``ru^2 + rs^2`` of :func:`~velofit.core.mstep.residuals`, per cell and gene."""
    ru, rs = residuals(theta, t, data)
    return ru * ru + rs * rs


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
        damping=jnp.full((2, n_genes), 1e-2, theta0.dtype),
        converged=jnp.zeros(n_genes, bool),
        n_iter=jnp.zeros(n_genes, jnp.int32),
    )


def step(state: EMState, data: GeneData, exact: bool, config: EMConfig, full=True, m_step=True,
         penalty=None) -> EMState:
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
    m_step
        Update the parameters first (Python or traced boolean); ``False`` only reassigns
        the times.
    penalty
        Grid penalty of a full exact E-step (see :func:`e_step`).

    Returns
    -------
    The next :class:`EMState`; converged genes are carried over unchanged.
    """

    def update():
        theta, damping, _, t = levenberg_marquardt(state.theta, state.damping, state.loss, state.t, data, config.n_lm,
                                                  move_times=config.move_times)
        return theta, damping, t

    if m_step is True:
        theta, damping, t_m = update()
    else:
        theta, damping, t_m = jax.lax.cond(m_step, update, lambda: (state.theta, state.damping, state.t))
    t, loss = e_step(theta, t_m, data, exact, config, full, penalty)
    active = ~state.converged
    gain = (state.loss - loss) / jnp.maximum(state.loss, 1e-300)
    keep = active[None, :]
    return EMState(
        theta=jnp.where(keep, theta, state.theta),
        t=jnp.where(keep, t, state.t),
        loss=jnp.where(active, loss, state.loss),
        damping=jnp.where(keep, damping, state.damping),
        converged=state.converged | (gain < config.tol),
        n_iter=state.n_iter + active.astype(jnp.int32),
    )


class EMCarry(NamedTuple):
    """Everything the EM loop carries from one iteration to the next.

    Genes that share ``it``, ``exact`` and ``n_exact_done`` follow the same schedule from
    here on, whichever chunk they started in, so the fit can regroup the genes that have
    not finished into full chunks between calls of :func:`advance` (a chunk otherwise costs
    as many iterations as its slowest gene). Every gene's result depends only on its own
    data, so regrouping does not change it.

    Attributes
    ----------
    it
        ``()`` iterations done.
    exact
        ``()`` whether the exact stage has begun.
    n_exact_done
        ``()`` exact iterations done.
    state
        The :class:`EMState`.
    trace
        ``(max_iter + 1, n_genes)`` loss per iteration (``nan`` after a gene's last one).
    """

    it: jnp.ndarray
    exact: jnp.ndarray
    n_exact_done: jnp.ndarray
    state: EMState
    trace: jnp.ndarray


def start(data: GeneData, theta0, config: EMConfig) -> EMCarry:
    """The carry before the first iteration: initial parameters and explicit times.

    Parameters
    ----------
    data
        Observed data of the iterated cells.
    theta0
        ``(5, n_genes)`` initial log-parameters.
    config
        EM settings (static).

    Returns
    -------
    :class:`EMCarry`.
    """
    state = init(data, theta0)
    trace = jnp.full((config.max_iter + 1, theta0.shape[1]), jnp.nan, theta0.dtype)
    trace = trace.at[0].set(state.loss)
    n_explicit = min(config.n_explicit, config.max_iter)
    return EMCarry(jnp.int32(0), jnp.asarray(n_explicit == 0), jnp.int32(0), state, trace)


def advance(carry: EMCarry, data: GeneData, config: EMConfig, n_steps: int, final=False, penalty=None):
    """Run at most ``n_steps`` more iterations of the two-stage schedule.

    Parameters
    ----------
    carry
        From :func:`start` or a previous :func:`advance`.
    data
        Observed data of the iterated cells (``data.sample`` as for the M-step).
    config
        EM settings (static).
    n_steps
        Most iterations in this call (static).
    final
        Instead, time every row under the carried parameters: one full exact E-step and no
        M-step, whatever the schedule (:func:`assign_times`; Python or traced boolean).
    penalty
        Optional ``(2, config.n_grid, n_genes)`` grid penalty of that final E-step (see
        :func:`e_step`): the learned time prior's; the EM's own iterations never see it.

    Returns
    -------
    ``(carry, done)``: the new :class:`EMCarry` and the ``(n_genes,)`` genes whose fit is
    final (the schedule ended, or the gene converged in the exact stage).
    """
    n_explicit = min(config.n_explicit, config.max_iter)
    n_exact = config.max_iter - n_explicit
    if penalty is not None and final is not True:
        penalty = jnp.where(final, penalty, 0.0)  # x + 0 == x: the EM's searches are unchanged

    def schedule_open(carry):
        it, exact, n_exact_done, st, _ = carry
        stage_open = jnp.where(exact, n_exact_done < n_exact, it < n_explicit)
        return stage_open & ~(exact & jnp.all(st.converged))

    def body(carry):
        it, exact, n_exact_done, st, tr = carry
        active = ~st.converged
        # Exact throughout needs no branch: the explicit E-step is then compiled only for init.
        full = final | (n_exact_done < 2) | (n_exact_done % config.full_every == 0)
        st = step(st, data, True if n_explicit == 0 else exact | final, config, full,
                  m_step=True if final is False else ~final, penalty=penalty)
        tr = tr.at[it + 1].set(jnp.where(active, st.loss, jnp.nan))
        it = it + 1
        n_exact_done = n_exact_done + exact.astype(jnp.int32)
        # Leave the explicit stage after n_explicit iterations or once every gene converged;
        # every gene then gets exact iterations until it converges again.
        switch = ~exact & (n_exact > 0) & ((it >= n_explicit) | jnp.all(st.converged))
        st = st._replace(converged=jnp.where(switch, False, st.converged))
        return EMCarry(it, exact | switch, n_exact_done, st, tr)

    stop = carry.it + jnp.where(final, 1, n_steps)
    carry = jax.lax.while_loop(lambda c: (final | schedule_open(c)) & (c.it < stop), body, carry)
    done = ~schedule_open(carry) | (carry.exact & carry.state.converged)
    return carry, done


def assign_times(theta, t_prev, data: GeneData, config: EMConfig):
    """Final exact time assignment (full grid search and Newton) of a block of cells.

    The per-gene fit runs it as :func:`fit_step` with ``final`` (one compiled program).

    Parameters
    ----------
    theta
        ``(5, n_genes)`` fitted log-parameters.
    t_prev
        ``(n_cells, n_genes)`` times of the last EM iteration, ``nan`` for cells that were
        not iterated: where finite, a cell keeps it unless the search finds a nearer point,
        so the loss over the iterated cells never rises above the EM's last one.
    data
        Observed data of the block.
    config
        EM settings (static; ``n_grid`` and ``n_newton``).

    Returns
    -------
    ``(t, loss)``: ``(n_cells, n_genes)`` absolute times and the ``(n_genes,)`` weighted loss
    of the block.
    """
    return e_step(theta, t_prev, data, True, config)


def timing_carry(theta, t_prev, max_iter: int) -> EMCarry:
    """The carry with which :func:`fit_step`'s ``final`` branch times rows under ``theta``.

    Parameters
    ----------
    theta
        ``(5, n_genes)`` fitted log-parameters.
    t_prev
        ``(n_cells, n_genes)`` previous times (``nan`` where none), as for
        :func:`assign_times`; or ``None``, to be replaced per block of cells.
    max_iter
        ``config.max_iter`` (the length of the carry's trace).

    Returns
    -------
    :class:`EMCarry`, its constants NumPy arrays (made without compiling anything; the
    compiled program takes them as they are, or after one ``jax.device_put``).
    """
    width = theta.shape[1]
    zeros = np.zeros(width, theta.dtype)
    state = EMState(theta, t_prev, zeros, np.zeros((2, width), theta.dtype), np.zeros(width, bool), np.zeros(width, np.int32))
    return EMCarry(np.int32(0), np.bool_(True), np.int32(0), state, np.zeros((max_iter + 1, width), theta.dtype))


def fit_step(carry: EMCarry, data: GeneData, theta0, penalty, begin, final, config: EMConfig, n_steps: int):
    """Everything the per-gene fit computes, as one function so that it is compiled once.

    XLA compiles every program on its own, in seconds (most of a small fit's time), even
    where programs share code; so the fit's three uses are branches of one program of one
    shape (:mod:`velofit.core.programs`):

    - ``begin``: :func:`start` from ``theta0`` (``carry`` is ignored), then :func:`advance`;
    - ``final``: :func:`assign_times` of the carried parameters and times (a carry from
      :func:`timing_carry`), with the grid ``penalty`` (the learned time prior's: the
      prior's separate program took about a second to compile);
    - otherwise :func:`advance` ``n_steps`` more iterations.

    Parameters
    ----------
    carry
        The :class:`EMCarry` (any values of its shapes with ``begin``).
    data
        Observed data of the rows.
    theta0
        ``(5, n_genes)`` initial log-parameters, read with ``begin`` only.
    penalty
        ``(2, config.n_grid, n_genes)`` grid penalty, read with ``final`` only (zeros: the
        nearest point; :func:`velofit.core.time_prior.prior_penalty`).
    begin, final
        Traced booleans choosing the branch (not both).
    config
        EM settings (static).
    n_steps
        Most iterations of an :func:`advance` (static).

    Returns
    -------
    ``(carry, done)`` as for :func:`advance`; with ``final``, ``carry.state.t`` and
    ``carry.state.loss`` are those of :func:`assign_times`.
    """
    carry = jax.lax.cond(begin, lambda: start(data, theta0, config), lambda: carry)
    return advance(carry, data, config, n_steps, final, penalty)


fit_step_jit = jax.jit(fit_step, static_argnames=("config", "n_steps"))
