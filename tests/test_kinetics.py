"""Closed-form kinetics (MODEL.md section 1) against independent references.

References used: numerical integration of the ODE (``scipy.integrate.solve_ivp``), the ODE
itself via forward-mode derivatives, a 60-digit ``decimal`` evaluation of the closed form,
and central finite differences.
"""

from __future__ import annotations

import decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

from velofit.core.kinetics import (
    KineticParams,
    exp_difference_ratio,
    phase_state,
    spliced,
    switch_state,
    trajectory,
    unspliced,
    velocities,
)

#: Jitted entry points: eager dispatch of every primitive would dominate the run time.
_state = jax.jit(phase_state)
_traj = jax.jit(trajectory)
_vel = jax.jit(velocities)
_switch = jax.jit(switch_state)
_ratio = jax.jit(exp_difference_ratio)


@jax.jit
def _state_jvp(tau, u0, s0, alpha_k, beta, gamma):
    """``(u, s)`` and their tau-derivatives by forward mode."""
    return jax.jvp(lambda t: phase_state(t, u0, s0, alpha_k, beta, gamma), (tau,), (jnp.ones_like(tau),))


def _sum_state(beta, gamma, tau, u0, s0, alpha_k):
    u, s = phase_state(tau, u0, s0, alpha_k, beta, gamma)
    return jnp.sum(u) + jnp.sum(s * (1.0 + jnp.arange(s.size)))


_grad_rates = jax.jit(jax.grad(_sum_state, argnums=(0, 1)))
_grad_all = jax.jit(jax.grad(_sum_state, argnums=(0, 1, 2, 3, 4, 5)))
_sum_state_jit = jax.jit(_sum_state)
_jac_rates = jax.jit(jax.jacfwd(_sum_state, argnums=(0, 1)))
_spliced = jax.jit(spliced)
_unspliced = jax.jit(unspliced)


@jax.jit
def _traj_jvp(t, p):
    """``trajectory`` and its derivative in ``t`` by forward mode."""
    return jax.jvp(lambda x: trajectory(x, p), (t,), (jnp.ones_like(t),))


RATE = st.floats(1e-3, 1e2, allow_nan=False, allow_infinity=False)
TAU = st.floats(0.0, 50.0, allow_nan=False, allow_infinity=False)
HYPO = settings(max_examples=40, deadline=None)


def _np(*xs):
    return tuple(np.asarray(x) for x in xs)


def _ode_solution(taus, u0, s0, alpha_k, beta, gamma):
    """Reference ``(u, s)`` at ``taus`` by integrating the ODE (rtol 1e-10)."""

    def rhs(_, y):
        return [alpha_k - beta * y[0], beta * y[0] - gamma * y[1]]

    scale = max(abs(u0), abs(s0), alpha_k / beta, alpha_k / gamma, 1e-300)
    sol = solve_ivp(
        rhs,
        (0.0, float(np.max(taus))),
        [u0, s0],
        method="DOP853",
        t_eval=taus,
        rtol=1e-10,
        atol=1e-13 * scale,
    )
    assert sol.success
    return sol.y[0], sol.y[1], scale


def _decimal_state(tau, u0, s0, alpha_k, beta, gamma, digits=60):
    """``(u, s)`` of the closed form in ``digits``-digit decimal arithmetic (exact rates)."""
    with decimal.localcontext() as ctx:
        ctx.prec = digits
        D = decimal.Decimal
        tau, u0, s0, a, b, g = (D(float(x)) for x in (tau, u0, s0, alpha_k, beta, gamma))
        eb, eg = (-b * tau).exp(), (-g * tau).exp()
        u = u0 * eb + a / b * (1 - eb)
        ratio = -tau * eb if g == b else (eg - eb) / (g - b)
        s = s0 * eg + a / g * (1 - eg) + (a - b * u0) * ratio
        return float(u), float(s)


# --------------------------------------------------------------------------------------
# Closed form vs numerical integration
# --------------------------------------------------------------------------------------

_RATE_CASES = [
    # (alpha, beta, gamma)
    (2.0, 1.0, 0.3),  # gamma < beta
    (5.0, 0.4, 1.7),  # gamma > beta
    (3.0, 0.8, 0.8),  # gamma == beta exactly
    (1.5, 1.3, 1.3 + 5e-9),  # |gamma - beta| < 1e-8
    (1.5, 1.3, 1.3 - 3e-9),
    (7.0, 2.5, 2.5 * (1 + 1e-12)),
    (0.7, 0.05, 3.0),  # very different rates
    (40.0, 4.0, 0.02),
]


@pytest.mark.parametrize("alpha,beta,gamma", _RATE_CASES)
@pytest.mark.parametrize("phase", ["induction", "repression"])
def test_closed_form_matches_ode_integration(alpha, beta, gamma, phase):
    if phase == "induction":
        u0, s0, alpha_k = 0.0, 0.0, alpha
    else:
        u0, s0, alpha_k = 1.7 * alpha / beta * 0.6, 0.9 * alpha / gamma * 0.6, 0.0
    taus = np.concatenate([[0.0, 1e-6, 1e-3], np.linspace(0.01, 12.0, 60)])
    ref_u, ref_s, scale = _ode_solution(taus, u0, s0, alpha_k, beta, gamma)
    u, s = _np(*_state(jnp.asarray(taus), u0, s0, alpha_k, beta, gamma))
    np.testing.assert_allclose(u, ref_u, rtol=1e-7, atol=1e-8 * scale)
    np.testing.assert_allclose(s, ref_s, rtol=1e-7, atol=1e-8 * scale)
    # the single-species entry points agree with phase_state
    s_only = np.asarray(_spliced(jnp.asarray(taus), u0, s0, alpha_k, beta, gamma))
    u_only = np.asarray(_unspliced(jnp.asarray(taus), u0, alpha_k, beta))
    np.testing.assert_allclose(s_only, s, rtol=1e-12, atol=1e-14 * scale)
    np.testing.assert_allclose(u_only, u, rtol=1e-12, atol=1e-14 * scale)


def test_closed_form_matches_ode_random_rates():
    rng = np.random.default_rng(7)
    for _ in range(12):
        alpha, beta, gamma = 10 ** rng.uniform(-1.5, 1.0, 3)
        if rng.random() < 0.3:
            gamma = beta * (1 + rng.uniform(-1e-8, 1e-8))
        u0, s0 = rng.uniform(0, 5, 2)
        taus = np.sort(rng.uniform(0, 15, 40))
        for uu0, ss0, ak in [(0.0, 0.0, alpha), (u0, s0, 0.0), (u0, s0, alpha)]:
            ref_u, ref_s, scale = _ode_solution(taus, uu0, ss0, ak, beta, gamma)
            u, s = _np(*_state(jnp.asarray(taus), uu0, ss0, ak, beta, gamma))
            np.testing.assert_allclose(u, ref_u, rtol=1e-7, atol=1e-8 * scale)
            np.testing.assert_allclose(s, ref_s, rtol=1e-7, atol=1e-8 * scale)


@pytest.mark.parametrize("gap", [0.0, 1e-14, -1e-14, 1e-11, -1e-11, 3e-9, -3e-9, 1e-6, 0.1, -0.1, 2.0])
def test_closed_form_matches_high_precision_reference(gap):
    """60-digit evaluation of the same formula: catches cancellation near gamma == beta."""
    alpha, beta, u0, s0 = 3.0, 0.9, 1.2, 0.4
    gamma = beta + gap
    for tau in [0.0, 1e-7, 1e-3, 0.3, 2.0, 9.0, 30.0]:
        for ak, uu0, ss0 in [(alpha, 0.0, 0.0), (0.0, u0, s0), (alpha, u0, s0)]:
            ref_u, ref_s = _decimal_state(tau, uu0, ss0, ak, beta, gamma)
            u, s = (float(x) for x in _state(jnp.float64(tau), uu0, ss0, ak, beta, gamma))
            scale = max(ak / beta, ak / gamma, uu0, ss0)
            assert abs(u - ref_u) <= 1e-13 * scale, (tau, ak, u, ref_u)
            assert abs(s - ref_s) <= 1e-12 * scale, (tau, ak, s, ref_s)


def test_exp_difference_ratio_high_precision():
    beta = 1.1
    for gap in [0.0, 1e-15, -1e-13, 1e-10, 1e-9, -1e-8, 1e-4, 0.4, -0.6, 3.0]:
        gamma = beta + gap
        for tau in [0.0, 1e-9, 0.01, 0.5, 3.0, 20.0]:
            with decimal.localcontext() as ctx:
                ctx.prec = 60
                D = decimal.Decimal
                b, g, t = D(beta), D(gamma), D(tau)
                ref = -t * (-b * t).exp() if g == b else ((-g * t).exp() - (-b * t).exp()) / (g - b)
            got = float(_ratio(jnp.float64(tau), beta, gamma))
            assert abs(got - float(ref)) <= 1e-13 * (abs(float(ref)) + 1e-300), (gap, tau, got, float(ref))


def test_repression_tail_keeps_relative_accuracy():
    """Deep in repression u = u0 exp(-beta tau) is tiny but must not lose all its digits.

    ``phase_state`` forms ``exp(-beta tau)`` as ``1 + expm1(-beta tau)``, which cancels
    catastrophically once ``beta tau`` exceeds a few units (it is exactly 0 beyond ~37).
    """
    tau = jnp.asarray([5.0, 10.0, 20.0, 30.0, 40.0])
    beta, gamma, u0, s0 = 1.0, 0.5, 2.0, 3.0
    u, s = _np(*_state(tau, u0, s0, 0.0, beta, gamma))
    ref = [_decimal_state(t, u0, s0, 0.0, beta, gamma) for t in np.asarray(tau)]
    ref_u, ref_s = (np.array(x) for x in zip(*ref, strict=True))
    np.testing.assert_allclose(u, ref_u, rtol=1e-10)
    np.testing.assert_allclose(s, ref_s, rtol=1e-10)


# --------------------------------------------------------------------------------------
# ODE identity through forward-mode derivatives
# --------------------------------------------------------------------------------------


def _check_ode_identity(tau, u0, s0, alpha_k, beta, gamma, rtol=1e-9):
    tau = jnp.asarray(tau, dtype=jnp.float64)
    (u, s), (du, ds) = _state_jvp(tau, u0, s0, alpha_k, beta, gamma)
    u, s, du, ds = _np(u, s, du, ds)
    # scale of the right-hand side: its terms' sizes along the phase
    scale = (
        np.abs(alpha_k) + beta * np.maximum(np.abs(u), np.abs(u0)) + gamma * np.maximum(np.abs(s), np.abs(s0))
    )
    err_u = np.abs(du - (alpha_k - beta * u))
    err_s = np.abs(ds - (beta * u - gamma * s))
    assert np.all(err_u <= rtol * scale), np.max(err_u / scale)
    assert np.all(err_s <= rtol * scale), np.max(err_s / scale)


@pytest.mark.parametrize("alpha,beta,gamma", _RATE_CASES)
def test_ode_identity_both_phases(alpha, beta, gamma):
    taus = np.concatenate([[0.0, 1e-9, 1e-4], np.linspace(0.01, 25.0, 200)])
    _check_ode_identity(taus, 0.0, 0.0, alpha, beta, gamma)
    _check_ode_identity(taus, 2.3, 1.1, 0.0, beta, gamma)
    _check_ode_identity(taus, 2.3, 1.1, alpha, beta, gamma)


_jac_tau = jax.jit(jax.jacfwd(lambda t, b, g: jnp.stack(phase_state(t, 0.4, 0.2, 1.3, b, g))))


def test_ode_identity_jacfwd_matches_velocity_scalar():
    """jacfwd of a scalar evaluation, near the series/direct branch boundaries of the ratio."""
    beta = 0.7
    for gamma in [beta, beta + 1e-11, beta + 2e-10, beta + 0.3, beta + 0.9]:
        for tau in [
            0.5 / abs(gamma - beta + 1e-300) * 0.999,
            0.5 / abs(gamma - beta + 1e-300) * 1.001,
            0.1,
            3.0,
        ]:
            tau = min(tau, 40.0)
            deriv = np.asarray(_jac_tau(jnp.float64(tau), beta, gamma))
            u, s = (float(x) for x in _state(jnp.float64(tau), 0.4, 0.2, 1.3, beta, gamma))
            np.testing.assert_allclose(deriv, [1.3 - beta * u, beta * u - gamma * s], rtol=1e-9, atol=1e-12)


@HYPO
@given(
    alpha=RATE,
    beta=RATE,
    gamma=RATE,
    tau=TAU,
    equal=st.booleans(),
    u0=st.floats(0, 1e3),
    s0=st.floats(0, 1e3),
)
def test_ode_identity_property(alpha, beta, gamma, tau, equal, u0, s0):
    if equal:
        gamma = beta
    _check_ode_identity([tau], 0.0, 0.0, alpha, beta, gamma)
    _check_ode_identity([tau], u0, s0, 0.0, beta, gamma)


# --------------------------------------------------------------------------------------
# gamma == beta: continuity, finiteness of values and gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.3, 1.0, 7.0, 90.0])
def test_continuity_across_gamma_equal_beta(beta):
    taus = jnp.asarray([0.0, 1e-6, 0.01, 0.5, 1.0 / beta, 3.0 / beta, 20.0 / beta])
    for u0, s0, alpha_k in [(0.0, 0.0, 2.0), (1.5, 2.5, 0.0), (1.5, 0.5, 2.0)]:
        u_eq, s_eq = _np(*_state(taus, u0, s0, alpha_k, beta, beta))
        assert np.all(np.isfinite(u_eq)) and np.all(np.isfinite(s_eq))
        scale = max(u0, s0, alpha_k / beta)
        for gap in [1e-9, -1e-9, 1e-12, -1e-12]:
            gamma = beta * (1.0 + gap)
            u, s = _np(*_state(taus, u0, s0, alpha_k, beta, gamma))
            np.testing.assert_allclose(u, u_eq, rtol=1e-8, atol=1e-12 * scale)
            np.testing.assert_allclose(s, s_eq, rtol=1e-8, atol=1e-12 * scale)


def test_limit_formula_at_gamma_equal_beta():
    """s = s0 e^{-b t} + (a/b)(1 - e^{-b t}) - (a - b u0) t e^{-b t} when gamma == beta."""
    a, b, u0, s0 = 2.5, 0.6, 0.8, 1.9
    t = np.linspace(0, 30, 61)
    for ak in (0.0, a):
        s = np.asarray(spliced(jnp.asarray(t), u0, s0, ak, b, b))
        ref = s0 * np.exp(-b * t) + ak / b * (1 - np.exp(-b * t)) - (ak - b * u0) * t * np.exp(-b * t)
        np.testing.assert_allclose(s, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("beta", [0.05, 1.0, 12.0])
def test_gradients_finite_and_correct_at_gamma_equal_beta(beta):
    taus = jnp.asarray([0.0, 1e-5, 0.2, 1.0, 5.0, 30.0]) / beta
    for u0, s0, alpha_k in [(0.0, 0.0, 1.7), (2.0, 3.0, 0.0)]:
        g_b, g_g = (float(x) for x in _grad_rates(beta, beta, taus, u0, s0, alpha_k))
        assert np.isfinite(g_b) and np.isfinite(g_g)
        # central differences straddling gamma == beta (step >> any cancellation)
        h = 1e-5 * beta

        def f(b, g, u0=u0, s0=s0, alpha_k=alpha_k):
            return float(_sum_state_jit(b, g, taus, u0, s0, alpha_k))

        fd_g = (f(beta, beta + h) - f(beta, beta - h)) / (2 * h)
        fd_b = (f(beta + h, beta) - f(beta - h, beta)) / (2 * h)
        scale = abs(f(beta, beta)) / beta
        assert abs(g_g - fd_g) <= 1e-6 * scale, (g_g, fd_g)
        assert abs(g_b - fd_b) <= 1e-6 * scale, (g_b, fd_b)
        # and just off the limit the gradient is continuous
        for gap in (1e-9, -1e-9):
            # (autodiff of expm1(x)/d loses ~eps/x relative just above the series cut-off
            # x = 1e-10, hence 1e-5 and not tighter; a jump or a kink would be O(1))
            near = np.asarray(_grad_rates(beta, beta * (1 + gap), taus, u0, s0, alpha_k))
            np.testing.assert_allclose(near, [g_b, g_g], rtol=1e-5, atol=1e-9 * scale)


@jax.jit
def _traj_loss(log_params, t):
    p = KineticParams(*jnp.exp(log_params))
    u, s = trajectory(t, p)
    return jnp.sum(p.scaling * u + s * s)


_traj_grad = jax.jit(jax.grad(_traj_loss))


def test_trajectory_gradients_finite_at_gamma_equal_beta():
    t = jnp.linspace(0.0, 12.0, 50)
    log_params = jnp.log(jnp.asarray([2.0, 0.8, 0.8, 4.0, 1.3]))
    grad = np.asarray(_traj_grad(log_params, t))
    assert np.all(np.isfinite(grad))
    # nearby gamma gives nearby gradients (no kink or jump at the limit)
    for gap in (1e-9, -1e-9):
        near = np.asarray(_traj_grad(log_params.at[2].add(gap), t))
        np.testing.assert_allclose(near, grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "beta,gamma,tau",
    [(17.0, 1.0, 45.0), (100.0, 0.01, 8.0), (1.0, 40.0, 30.0), (60.0, 0.5, 50.0)],
)
def test_reverse_mode_gradients_finite_when_rates_far_apart(beta, gamma, tau):
    """jax.grad must stay finite where |gamma - beta| tau is large.

    The value is finite there; reverse mode must not pick up an inf/NaN from a branch that
    ``jnp.where`` discards (the value of the untaken branch must itself be finite).
    """
    taus = jnp.asarray([tau])
    for u0, s0, alpha_k in [(0.0, 0.0, 1.0), (2.0, 3.0, 0.0)]:
        grads = _grad_all(beta, gamma, taus, u0, s0, alpha_k)
        names = ("beta", "gamma", "tau")
        for name, grad in zip(names, grads[:3], strict=True):
            assert np.all(np.isfinite(np.asarray(grad))), (name, grad)
    log_params = jnp.log(jnp.asarray([1.0, beta, gamma, 2.0, 1.0]))
    # (same shape as the test above: one compilation)
    grad = np.asarray(_traj_grad(log_params, jnp.linspace(0.0, 2.0 + tau, 50)))
    assert np.all(np.isfinite(grad)), grad


def test_forward_mode_gradients_finite_when_rates_far_apart():
    """Forward mode (what the M-step's Jacobian uses) is finite over the same cases."""
    for beta, gamma, tau in [(17.0, 1.0, 45.0), (100.0, 0.01, 8.0), (60.0, 0.5, 50.0)]:
        taus = jnp.asarray([tau])
        jac = _jac_rates(beta, gamma, taus, 0.0, 0.0, 1.0)
        assert all(np.isfinite(float(x)) for x in jac)


# --------------------------------------------------------------------------------------
# Properties over the whole rate range
# --------------------------------------------------------------------------------------


@HYPO
@given(alpha=RATE, beta=RATE, gamma=RATE, tau=TAU, dtau=st.floats(1e-6, 10.0), equal=st.booleans())
def test_induction_finite_nonnegative_monotone(alpha, beta, gamma, tau, dtau, equal):
    if equal:
        gamma = beta
    taus = jnp.asarray([tau, tau + dtau])
    u, s = _np(*_state(taus, 0.0, 0.0, alpha, beta, gamma))
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(s))
    assert np.all(u >= 0)
    # s ~ alpha beta tau^2 / 2 at small tau is the difference of two O(alpha tau) terms:
    # allow a rounding error of that size, not more
    assert np.all(s >= -1e-14 * alpha * np.asarray(taus))
    assert u[1] >= u[0]
    # bounded by the steady state
    assert np.all(u <= alpha / beta * (1 + 1e-12))
    assert np.all(s <= alpha / gamma * (1 + 1e-12))


@HYPO
@given(
    alpha=RATE,
    beta=RATE,
    gamma=RATE,
    tau=TAU,
    equal=st.booleans(),
    u0=st.floats(0, 1e3),
    s0=st.floats(0, 1e3),
)
def test_gradients_finite_property(alpha, beta, gamma, tau, equal, u0, s0):
    if equal:
        gamma = beta
    taus = jnp.asarray([tau])
    for uu0, ss0, ak in [(0.0, 0.0, alpha), (u0, s0, 0.0)]:
        fwd = _jac_rates(beta, gamma, taus, uu0, ss0, ak)
        assert all(np.isfinite(float(x)) for x in fwd), ("forward", fwd)
        rev = _grad_rates(beta, gamma, taus, uu0, ss0, ak)
        assert all(np.isfinite(float(x)) for x in rev), ("reverse", rev)


@HYPO
@given(beta=RATE, gamma=RATE, tau=TAU, u0=st.floats(0, 1e3), s0=st.floats(0, 1e3), equal=st.booleans())
def test_repression_finite_nonnegative_decreasing_u(beta, gamma, tau, u0, s0, equal):
    if equal:
        gamma = beta
    taus = jnp.asarray([tau, tau + 0.5])
    u, s = _np(*_state(taus, u0, s0, 0.0, beta, gamma))
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(s))
    assert np.all(u >= 0) and np.all(s >= 0)
    assert u[1] <= u[0]
    assert np.all(u <= u0 * (1 + 1e-12))


@HYPO
@given(alpha=RATE, beta=RATE, gamma=RATE, t_=st.floats(1e-3, 50.0), scaling=st.floats(0.1, 10.0))
def test_trajectory_continuous_at_switch(alpha, beta, gamma, t_, scaling):
    p = KineticParams(*(jnp.float64(x) for x in (alpha, beta, gamma, t_, scaling)))
    u_, s_ = (float(x) for x in _switch(p))
    left = float(np.nextafter(t_, -np.inf))
    right = float(np.nextafter(t_, np.inf))
    u, s = _np(*_traj(jnp.asarray([left, t_, right]), p))
    # s at small tau is a difference of O(alpha tau) terms: absolute rounding ~eps alpha t_
    for k in range(3):
        assert abs(u[k] - u_) <= 1e-12 * u_ + 1e-300
        assert abs(s[k] - s_) <= 1e-12 * s_ + 1e-14 * alpha * t_
    # and switch_state is the induction phase at t_
    ui, si = (float(x) for x in _state(jnp.float64(t_), 0.0, 0.0, alpha, beta, gamma))
    assert ui == u_ and si == s_


def test_trajectory_phases_and_start():
    p = KineticParams(*(jnp.float64(x) for x in (3.0, 1.2, 0.4, 2.5, 1.0)))
    t = jnp.asarray([0.0, 1.0, 2.5, 4.0])
    u, s = _np(*_traj(t, p))
    assert u[0] == 0.0 and s[0] == 0.0
    iu, is_ = _np(*_state(jnp.float64(1.0), 0.0, 0.0, 3.0, 1.2, 0.4))
    np.testing.assert_allclose([u[1], s[1]], [iu, is_], rtol=1e-15)
    u_, s_ = _np(*_switch(p))
    ru, rs = _np(*_state(jnp.float64(1.5), u_, s_, 0.0, 1.2, 0.4))
    np.testing.assert_allclose([u[3], s[3]], [ru, rs], rtol=1e-14)


def test_trajectory_broadcasts_over_genes():
    rng = np.random.default_rng(3)
    n_genes = 6
    params = KineticParams(*(jnp.asarray(rng.uniform(0.2, 3.0, n_genes)) for _ in range(5)))
    t = jnp.asarray(rng.uniform(0, 6, (40, n_genes)))
    u, s = _np(*_traj(t, params))
    for g in range(n_genes):
        pg = KineticParams(*(x[g] for x in params))
        ug, sg = _np(*_traj(t[:, g], pg))
        np.testing.assert_allclose(u[:, g], ug, rtol=1e-13, atol=1e-300)
        np.testing.assert_allclose(s[:, g], sg, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("gamma", [0.35, 1.1, 1.1 + 1e-10])
def test_velocities_match_numerical_derivative_of_trajectory(gamma):
    p = KineticParams(*(jnp.float64(x) for x in (2.0, 1.1, gamma, 3.0, 1.0)))
    t = np.concatenate([np.linspace(0.05, 2.9, 30), np.linspace(3.1, 12.0, 30)])
    vu, vs = _np(*_vel(jnp.asarray(t), p))
    h = 1e-5
    up, sp = _np(*_traj(jnp.asarray(t + h), p))
    um, sm = _np(*_traj(jnp.asarray(t - h), p))
    scale = 2.0 + 1.1 * 2.0 / 1.1 + gamma * 2.0 / gamma
    np.testing.assert_allclose(vu, (up - um) / (2 * h), rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(vs, (sp - sm) / (2 * h), rtol=0, atol=1e-8 * scale)
    # and the exact forward-mode derivative
    (_, _), (du, ds) = _traj_jvp(jnp.asarray(t), p)
    np.testing.assert_allclose(vu, np.asarray(du), rtol=1e-12, atol=1e-13 * scale)
    np.testing.assert_allclose(vs, np.asarray(ds), rtol=1e-10, atol=1e-13 * scale)
    # repression really uses alpha_k = 0: v_u < 0 after the switch, > 0 before
    assert np.all(vu[t < 3.0] > 0) and np.all(vu[t > 3.0] < 0)


def test_kinetics_vmap_agrees_with_broadcasting():
    p = KineticParams(*(jnp.asarray([1.0, 2.0, 3.0]) * x for x in (2.0, 0.5, 0.5, 1.5, 1.0)))
    t = jnp.linspace(0.0, 8.0, 33)[:, None] * jnp.ones(3)
    broadcast = _np(*_traj(t, p))
    vmapped = _np(*jax.jit(jax.vmap(trajectory, in_axes=(1, KineticParams(0, 0, 0, 0, 0)), out_axes=1))(t, p))
    for a, b in zip(broadcast, vmapped, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-300)
