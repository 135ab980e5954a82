"""Closed-form solution of the two-state splicing kinetics (MODEL.md section 1).

Every function here is elementwise and broadcasts: pass per-gene parameters of shape
``(n_genes,)`` and times of shape ``(n_cells, n_genes)`` to evaluate all genes at once, or
scalars for one gene. They are written with ``jax.numpy`` and are safe to ``jit``, ``vmap``
and differentiate (no ``0/0`` branches reach the gradient).

Numerics
--------
* ``u(tau) = u0 e^{-beta tau} - (alpha/beta) expm1(-beta tau)`` avoids the cancellation of
  ``u_inf + (u0 - u_inf) e^{-beta tau}`` when ``alpha/beta`` is large.
* ``s`` needs ``(e^{-gamma tau} - e^{-beta tau}) / (gamma - beta)``. It is evaluated as
  ``e^{-beta tau} expm1(-(gamma-beta) tau) / (gamma-beta)`` when ``|gamma-beta| tau`` is
  small (accurate down to and at ``gamma == beta``, where it tends to ``-tau e^{-beta tau}``)
  and directly otherwise, so there is no 0/0 and no overflow. scVelo drops this term at
  ``gamma == beta``; velofit keeps it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

#: Below this |(gamma - beta) * tau| the second-order series of expm1(-x)/x is used.
_SERIES_LIMIT = 1e-10
#: Above this |(gamma - beta) * tau| the direct difference of exponentials is used.
_DIRECT_LIMIT = 0.5


class KineticParams(NamedTuple):
    """Per-gene kinetic parameters, each an array of shape ``(n_genes,)`` (or scalars).

    Attributes
    ----------
    alpha
        Transcription rate during induction (``alpha_off = 0`` during repression).
    beta
        Splicing rate, in the units of the *scaled* unspliced abundance ``Mu / scaling``.
    gamma
        Degradation rate of spliced mRNA.
    t_
        Switching time from induction to repression.
    scaling
        Factor between observed and modelled unspliced abundance: ``Mu ~ scaling * u``.
    """

    alpha: jnp.ndarray
    beta: jnp.ndarray
    gamma: jnp.ndarray
    t_: jnp.ndarray
    scaling: jnp.ndarray


def _ratio_from_exps(tau, beta, gamma, exp_b, exp_g):
    d = gamma - beta
    x = d * tau
    is_near = jnp.abs(x) <= _DIRECT_LIMIT
    tiny = jnp.abs(x) < _SERIES_LIMIT
    safe_d = jnp.where(tiny, 1.0, d)
    # Each branch sees only arguments valid for it, so no inf/nan reaches any gradient.
    x_near = jnp.where(is_near, x, 0.0)
    # expm1(-x)/d == -tau * (1 - x/2 + ...); the series is exact to rounding for |x| < 1e-10
    near = exp_b * jnp.where(tiny, -tau * (1.0 - 0.5 * x), jnp.expm1(-x_near) / safe_d)
    far = (exp_g - exp_b) / safe_d
    return jnp.where(is_near, near, far)


def exp_difference_ratio(tau, beta, gamma):
    """Return ``(exp(-gamma tau) - exp(-beta tau)) / (gamma - beta)``, stable at ``gamma == beta``.

    Parameters
    ----------
    tau
        Time since the start of the phase, ``>= 0``.
    beta, gamma
        Positive rates (broadcast against ``tau``).

    Returns
    -------
    Array of the broadcast shape; equals ``-tau * exp(-beta tau)`` when ``gamma == beta``.
    """
    return _ratio_from_exps(tau, beta, gamma, jnp.exp(-beta * tau), jnp.exp(-gamma * tau))


def phase_state(tau, u0, s0, alpha_k, beta, gamma):
    """Unspliced and spliced abundance ``(u(tau), s(tau))`` within one phase.

    Shares the exponentials between the two species, which is
    what the fitting loops call.

    Parameters
    ----------
    tau
        Time since the start of the phase, ``>= 0``.
    u0, s0
        State at ``tau = 0``.
    alpha_k
        Transcription rate of the phase.
    beta, gamma
        Splicing and degradation rates.

    Returns
    -------
    ``(u, s)`` in the broadcast shape; see :func:`unspliced` and :func:`spliced`.
    """
    # expm1 keeps (alpha/k)(1 - e^{-k tau}) accurate at small tau, exp keeps the decaying
    # tail accurate to relative precision at large tau: both are needed.
    em_b, exp_b = jnp.expm1(-beta * tau), jnp.exp(-beta * tau)
    em_g, exp_g = jnp.expm1(-gamma * tau), jnp.exp(-gamma * tau)
    u = u0 * exp_b - (alpha_k / beta) * em_b
    s = (
        s0 * exp_g
        - (alpha_k / gamma) * em_g
        + (alpha_k - beta * u0) * _ratio_from_exps(tau, beta, gamma, exp_b, exp_g)
    )
    return u, s


def unspliced(tau, u0, alpha, beta):
    """Unspliced abundance ``u(tau)`` from ``u0`` under constant transcription ``alpha``.

    Parameters
    ----------
    tau
        Time since the start of the phase, ``>= 0``.
    u0
        Unspliced abundance at ``tau = 0``.
    alpha, beta
        Transcription rate of the phase and splicing rate.

    Returns
    -------
    ``u0 e^{-beta tau} + (alpha/beta)(1 - e^{-beta tau})`` in the broadcast shape.
    """
    return u0 * jnp.exp(-beta * tau) - (alpha / beta) * jnp.expm1(-beta * tau)


def spliced(tau, u0, s0, alpha, beta, gamma):
    """Spliced abundance ``s(tau)`` from ``(u0, s0)`` under constant transcription ``alpha``.

    Parameters
    ----------
    tau
        Time since the start of the phase, ``>= 0``.
    u0, s0
        Unspliced and spliced abundance at ``tau = 0``.
    alpha, beta, gamma
        Transcription rate of the phase, splicing and degradation rates.

    Returns
    -------
    ``s_inf + (s0 - s_inf) e^{-gamma tau} + (alpha - beta u0)(e^{-gamma tau} - e^{-beta tau})
    / (gamma - beta)`` in the broadcast shape, with ``s_inf = alpha / gamma``; accurate at and
    near ``gamma == beta``.
    """
    return phase_state(tau, u0, s0, alpha, beta, gamma)[1]


def switch_state(params: KineticParams):
    """State ``(u_, s_)`` reached at the switching time ``t_`` of the induction phase.

    Parameters
    ----------
    params
        Kinetic parameters; ``t_`` is the induction length.

    Returns
    -------
    ``(u_, s_)``: arrays with the shape of the parameters.
    """
    return phase_state(params.t_, 0.0, 0.0, params.alpha, params.beta, params.gamma)


def trajectory(t, params: KineticParams):
    """Model abundances at absolute times ``t`` on each gene's own clock.

    The gene starts at ``(0, 0)`` at ``t = 0``, is induced until ``t_`` and represses after.

    Parameters
    ----------
    t
        Absolute times ``>= 0``, e.g. shape ``(n_cells, n_genes)``.
    params
        Kinetic parameters broadcasting against ``t`` (e.g. shape ``(n_genes,)``).

    Returns
    -------
    ``(u, s)``: model unspliced (scaled units) and spliced abundance, shape of ``t``.
    """
    induction = t < params.t_
    u_, s_ = switch_state(params)
    tau = jnp.where(induction, t, t - params.t_)
    tau = jnp.maximum(tau, 0.0)
    alpha_k = jnp.where(induction, params.alpha, 0.0)
    u0 = jnp.where(induction, 0.0, u_)
    s0 = jnp.where(induction, 0.0, s_)
    return phase_state(tau, u0, s0, alpha_k, params.beta, params.gamma)


def velocities(t, params: KineticParams):
    """Time derivatives of the model at absolute times ``t``.

    Parameters
    ----------
    t
        Absolute times, shape broadcasting against the parameters.
    params
        Kinetic parameters.

    Returns
    -------
    ``(v_u, v_s)`` with ``v_u = alpha_k - beta u`` and ``v_s = beta u - gamma s`` in the
    scaled units of the model (multiply ``v_u`` by ``scaling`` for observed units).
    """
    u, s = trajectory(t, params)
    alpha_k = jnp.where(t < params.t_, params.alpha, 0.0)
    return alpha_k - params.beta * u, params.beta * u - params.gamma * s
