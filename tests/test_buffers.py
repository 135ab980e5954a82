"""velofit.core.buffers.evaluate_once: the value of fn, once, or a fill where it is not wanted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from velofit.core.buffers import evaluate_once


def _curve(x, y):
    return {"a": jnp.exp(-x) * y, "b": jnp.sum(x * y, axis=0)}


def test_value_is_the_functions():
    x, y = jnp.linspace(0.0, 3.0, 12).reshape(4, 3), jnp.arange(12.0).reshape(4, 3)
    got = jax.jit(lambda x, y: evaluate_once(_curve, x, y))(x, y)
    want = _curve(x, y)
    np.testing.assert_allclose(got["a"], want["a"], rtol=1e-14)
    np.testing.assert_allclose(got["b"], want["b"], rtol=1e-14)  # a sum: its order may differ


@pytest.mark.parametrize("flag", [True, False])
def test_when_chooses_between_the_value_and_the_fill(flag):
    """A traced flag: one compiled program gives the value, or the fill without evaluating."""
    x = jnp.linspace(0.0, 1.0, 6)
    run = jax.jit(lambda x, when: evaluate_once(lambda v: jnp.sqrt(v) + 1.0, x, when=when, otherwise=jnp.nan))
    got = np.asarray(run(x, jnp.asarray(flag)))
    if flag:
        np.testing.assert_array_equal(got, np.sqrt(np.asarray(x)) + 1.0)
    else:
        assert np.isnan(got).all()


def test_forward_derivative_is_the_functions():
    x = jnp.linspace(0.1, 2.0, 5)
    _, tangent = jax.jvp(lambda v: evaluate_once(lambda w: jnp.exp(-w) * w, v), (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, np.exp(-np.asarray(x)) * (1.0 - np.asarray(x)), rtol=1e-6)
