"""The M-step (Levenberg-Marquardt; projected steps move the cells' times) of MODEL.md section 4."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from velofit.core.kinetics import KineticParams, trajectory
from velofit.core.mstep import (
    GeneData,
    gene_loss,
    levenberg_marquardt,
    params_from_log,
    residuals,
)

N_GENES, N_CELLS = 4, 300
#: alpha, beta, gamma, t_, scaling of the generating model, one column per gene
TRUE = np.array(
    [
        [3.0, 5.0, 1.5, 8.0],
        [0.8, 2.0, 0.5, 1.3],
        [0.4, 1.0, 0.5, 0.9],
        [3.0, 1.5, 4.0, 2.0],
        [1.0, 0.7, 2.0, 1.3],
    ]
)


def make_data(mu, ms, weights, std_u, std_s, sample=None) -> GeneData:
    """GeneData from arrays, whatever optional fields the current GeneData has."""
    fields = {"mu": mu, "ms": ms, "weights": weights, "std_u": std_u, "std_s": std_s}
    if "sample" in GeneData._fields:
        fields["sample"] = np.arange(0, np.shape(mu)[0], _STRIDE) if sample is None else sample
    return GeneData(**{k: jnp.asarray(v) for k, v in fields.items()})


_HAS_N_JAC = "n_jacobian_cells" in inspect.signature(levenberg_marquardt).parameters


#: M-step directions come from every _STRIDE-th cell (acceptance always uses all cells)
_STRIDE = 3


def _lm(theta, damping, loss, t, data, n_steps, move_times=True):
    kwargs = {"n_jacobian_cells": N_CELLS // _STRIDE} if _HAS_N_JAC else {}
    return levenberg_marquardt(theta, damping, loss, t, data, n_steps, move_times=move_times, **kwargs)


# n_steps is passed traced (fori_loop accepts a traced trip count): one compilation per shape
_lm_jit = jax.jit(_lm, static_argnames="move_times")


def _damping(value):
    """Initial damping of both kinds of step, every gene."""
    return jnp.full((2, N_GENES), value)
_loss = jax.jit(gene_loss)
_res = jax.jit(residuals)
_traj = jax.jit(trajectory)


def _problem(noise, seed=0):
    """Data generated at known times from TRUE (observed Mu = scaling * u)."""
    rng = np.random.default_rng(seed)
    theta_true = np.log(TRUE)
    p = KineticParams(*(jnp.asarray(x) for x in TRUE))
    span = TRUE[3] + 2.0 / np.minimum(TRUE[1], TRUE[2])
    t = rng.uniform(0, 1, (N_CELLS, N_GENES)) * span
    u, s = (np.asarray(x) for x in _traj(jnp.asarray(t), p))
    assert u.dtype == np.float64
    mu = TRUE[4] * u
    ms = s
    mu = mu + noise * mu.std(0) * rng.standard_normal(mu.shape)
    ms = ms + noise * ms.std(0) * rng.standard_normal(ms.shape)
    data = make_data(mu, ms, np.ones_like(mu), mu.std(0), ms.std(0))
    return theta_true, jnp.asarray(t), data


def test_residuals_definition():
    theta, t, data = _problem(noise=0.1)
    theta = jnp.asarray(theta) + 0.1
    ru, rs = (np.asarray(x) for x in _res(theta, t, data))
    p = params_from_log(theta)
    u, s = (np.asarray(x) for x in _traj(t, p))
    mu, ms = np.asarray(data.mu), np.asarray(data.ms)
    np.testing.assert_allclose(
        ru, (np.asarray(p.scaling) * u - mu) / np.asarray(data.std_u), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(rs, (s - ms) / np.asarray(data.std_s), rtol=1e-12, atol=1e-12)
    w = np.asarray(data.weights).copy()
    w[::3] = 0.0
    data_w = data._replace(weights=jnp.asarray(w))
    np.testing.assert_allclose(
        np.asarray(_loss(theta, t, data_w)), np.sum(w * (ru**2 + rs**2), axis=0), rtol=1e-12
    )


def test_zero_loss_at_truth_on_noise_free_data():
    theta, t, data = _problem(noise=0.0)
    assert np.max(np.asarray(_loss(jnp.asarray(theta), t, data))) < 1e-24


_SIGNS = np.array([[1, -1, 1, -1], [-1, 1, 1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [1, -1, -1, 1]])


def test_recovers_exact_parameters_from_noise_free_data():
    """Times held (M-step directions from every third cell): the exact parameters from 20% off."""
    theta_true, t, data = _problem(noise=0.0)
    theta0 = jnp.asarray(theta_true + np.log(1 + 0.2 * _SIGNS))
    loss0 = _loss(theta0, t, data)
    assert np.all(np.asarray(loss0) > 1.0)  # 20% off is far from the optimum
    theta, _, loss, t_out = _lm_jit(theta0, _damping(1e-2), loss0, t, data, n_steps=60)
    rel = np.abs(np.exp(np.asarray(theta) - theta_true) - 1)
    assert np.max(rel) < 1e-6, rel
    assert np.max(np.asarray(loss)) < 1e-12
    np.testing.assert_array_equal(np.asarray(t_out), np.asarray(t))  # a subset of rows: plain steps


@functools.cache
def _noisy():
    """A noisy problem shared by tests (built lazily, inside the float64 scope)."""
    return _problem(noise=0.1, seed=11)


@settings(max_examples=40, deadline=None)
@given(
    offsets=st.lists(st.floats(-2.0, 2.0), min_size=5 * N_GENES, max_size=5 * N_GENES),
    log_damping=st.floats(-8.0, 8.0),
    n_steps=st.sampled_from([1, 3]),
    every_row=st.booleans(),
)
def test_levenberg_marquardt_never_increases_loss(offsets, log_damping, n_steps, every_row):
    """Plain steps (directions from every third row) and projected ones (every row: times move)."""
    theta_true, t, data = _noisy()
    if every_row:
        data = data._replace(sample=jnp.arange(N_CELLS))
    theta0 = jnp.asarray(theta_true + np.reshape(offsets, (5, N_GENES)))
    loss0 = np.asarray(_loss(theta0, t, data))
    theta, damping, loss, t_out = _lm_jit(theta0, _damping(10.0**log_damping), jnp.asarray(loss0), t, data,
                                          n_steps=n_steps)
    theta, damping, loss, t_out = (np.asarray(x) for x in (theta, damping, loss, t_out))
    assert np.all(np.isfinite(theta)) and np.all(np.isfinite(loss)) and np.all(t_out >= 0)
    assert np.all(loss <= loss0), (loss, loss0)
    # the reported loss is the loss of the returned parameters at the returned times
    np.testing.assert_allclose(loss, np.asarray(_loss(jnp.asarray(theta), jnp.asarray(t_out), data)), rtol=1e-10)
    # a gene whose loss did not move kept its parameters and its times
    same = loss == loss0
    np.testing.assert_array_equal(theta[:, same], np.asarray(theta0)[:, same])
    np.testing.assert_array_equal(t_out[:, same], np.asarray(t)[:, same])
    if not every_row:  # with a subset of the rows, times are held
        np.testing.assert_array_equal(t_out, np.asarray(t))
    assert np.all((damping > 0) & np.isfinite(damping))


def test_levenberg_marquardt_genes_are_independent():
    """A gene's update does not depend on the other genes' data or parameters."""
    theta_true, t, data = _noisy()
    theta0 = jnp.asarray(theta_true + 0.3)
    loss0 = _loss(theta0, t, data)
    damping0 = _damping(1e-2)
    ref = [np.asarray(x) for x in _lm_jit(theta0, damping0, loss0, t, data, n_steps=4)]
    # scramble genes 1..3 (data and parameters), keep gene 0
    rng = np.random.default_rng(0)
    mu, ms = np.asarray(data.mu).copy(), np.asarray(data.ms).copy()
    mu[:, 1:] = rng.permutation(mu[:, 1:]) * 3.0
    ms[:, 1:] = rng.uniform(0, 1, ms[:, 1:].shape)
    other = make_data(
        mu, ms, np.asarray(data.weights), np.asarray(data.std_u) * [1, 2, 3, 4], np.asarray(data.std_s)
    )
    theta1 = theta0.at[:, 1:].add(-0.5)
    loss1 = _loss(theta1, t, other)
    got = [np.asarray(x) for x in _lm_jit(theta1, damping0.at[:, 1:].set(5.0), loss1, t, other, n_steps=4)]
    np.testing.assert_array_equal(got[0][:, 0], ref[0][:, 0])
    np.testing.assert_array_equal(got[2][0], ref[2][0])
    np.testing.assert_array_equal(got[1][:, 0], ref[1][:, 0])
    np.testing.assert_array_equal(got[3][:, 0], ref[3][:, 0])


def test_curve_tangent_is_the_time_derivative_of_the_residuals():
    """The projected step's tangent, read from the residuals, equals d r / dt by autodiff
    (off the switch, where the derivative is one-sided)."""
    from velofit.core.mstep import _curve_tangent

    theta, t, data = _noisy()
    theta = jnp.asarray(theta) + 0.1
    t_ = np.exp(np.asarray(theta[3]))
    t = jnp.asarray(np.where(np.abs(np.asarray(t) - t_) < 1e-6, np.asarray(t) + 1e-3, np.asarray(t)))
    with jax.enable_x64(True):
        (ru, rs), (du, ds) = jax.jvp(lambda tt: residuals(theta, tt, data), (t,), (jnp.ones_like(t),))
        tu, ts = _curve_tangent(theta, t, ru, rs, data)
    np.testing.assert_allclose(np.asarray(tu), np.asarray(du), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(ts), np.asarray(ds), rtol=1e-9, atol=1e-9)


def test_cells_at_the_switch_take_one_side_whatever_their_last_bits():
    """A cell at the switch ``t_`` (the curve's corner, where the residuals are kinked) gives the
    same M-step whether rounding left its time at, just before or just after ``t_``
    (``on_switch``); otherwise its Jacobian is the induction or the repression side's."""
    theta_true, t, data = _problem(noise=0.1)
    data = data._replace(sample=jnp.arange(N_CELLS))  # every row: projected steps too
    theta = jnp.asarray(theta_true) + 0.15
    t_switch = np.exp(np.asarray(theta[3]))
    corner = np.zeros((N_CELLS, N_GENES), bool)
    corner[::10] = True  # 30 cells of each gene at the corner
    fits = []
    for toward in (t_switch, np.zeros(N_GENES), np.full(N_GENES, np.inf)):
        times = np.where(corner, np.nextafter(t_switch, toward)[None, :], np.asarray(t))
        times = jnp.asarray(times)
        out = _lm_jit(theta, _damping(1e-2), _loss(theta, times, data), times, data, 2)
        fits.append([np.asarray(x) for x in out])
    assert not np.array_equal(fits[0][0], np.asarray(theta)), "the M-step should move the parameters"
    for other in fits[1:]:
        for a, b in zip(fits[0], other, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
