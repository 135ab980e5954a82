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
  ``-tau e^{-beta tau} expm1(-x)/(-x)`` with ``x = (gamma-beta) tau`` when ``|x|`` is small
  (accurate down to and at ``gamma == beta``, where it tends to ``-tau e^{-beta tau}``)
  and directly otherwise, so there is no 0/0 and no overflow. scVelo drops this term at
  ``gamma == beta``; velofit keeps it.
* ``expm1`` costs three times ``exp`` on a CPU, and the fit evaluates these curves billions
  of times. So every ``expm1(y)`` is taken from the ``exp(y)`` computed anyway:
  ``exp(y) - 1`` where ``|y| >= 0.1`` (relative error below ``1.2e-15``), and the Taylor
  series of ``expm1(y)/y`` to ``y^10/11!`` below (truncation below ``3e-18``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

#: Below this |y|, expm1(y)/y is taken from its Taylor series; above, from exp(y) - 1.
_SERIES_LIMIT = 0.1
#: Highest power of y in that series (its next term is below 3e-18 relative at the limit).
_SERIES_ORDER = 10


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


def _expm1_over_y(y):
    """``expm1(y) / y`` by Horner's rule on its Taylor series (for ``|y| <= _SERIES_LIMIT``)."""
    # Multiplications by constants only: a division compiles differently in XLA's vectorised
    # and scalar loops, which made results depend on the chunk width in the last bit.
    acc = jnp.ones_like(y)
    for k in range(_SERIES_ORDER + 1, 1, -1):
        acc = 1.0 + (y * (1.0 / k)) * acc
    return acc


@jax.custom_jvp
def _expm1_from_exp(y, exp_y):
    """``expm1(y)`` given ``exp_y = exp(y)``: the series near 0, ``exp_y - 1`` elsewhere.

    Its derivative is ``exp_y`` (a custom JVP: differentiating the series branch would cost
    more than the function).
    """
    small = jnp.abs(y) < _SERIES_LIMIT
    y_small = jnp.where(small, y, 0.0)  # keeps the unused branch finite
    return jnp.where(small, y_small * _expm1_over_y(y_small), exp_y - 1.0)


@_expm1_from_exp.defjvp
def _expm1_from_exp_jvp(primals, tangents):
    y, exp_y = primals
    y_dot, _ = tangents  # exp_y is exp(y): its own tangent carries no extra information
    return _expm1_from_exp(y, exp_y), exp_y * y_dot


def _ratio_from_exps(tau, beta, gamma, exp_b, exp_g):
    d = gamma - beta
    x = d * tau
    near = jnp.abs(x) < _SERIES_LIMIT
    # Each branch sees only arguments valid for it, so no inf/nan reaches any gradient.
    x_near = jnp.where(near, x, 0.0)
    safe_d = jnp.where(near, 1.0, d)
    # expm1(-x)/d == -tau * expm1(-x)/(-x); at d == 0 exactly -tau.
    return jnp.where(near, -tau * exp_b * _expm1_over_y(-x_near), (exp_g - exp_b) / safe_d)


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
    # tail accurate to relative precision at large tau: both are needed (module docstring).
    exp_b, exp_g = jnp.exp(-beta * tau), jnp.exp(-gamma * tau)
    em_b, em_g = _expm1_from_exp(-beta * tau, exp_b), _expm1_from_exp(-gamma * tau, exp_g)
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
