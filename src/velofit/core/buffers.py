"""Compute a shared intermediate once, into memory, instead of once per consumer.

XLA's CPU compiler fuses elementwise operations into the operations that consume them and
has no multi-output fusion: an intermediate that several outputs share (the curve's
abundances, from which a distance, its gradient and its curvature are formed) is recomputed
inside each of their fusions, unless it ends in an operation XLA deems expensive (``exp``,
a division). ``jax.lax.optimization_barrier`` does not prevent this on CPU: with jaxlib
0.10.2 a Horner polynomial read by three outputs is compiled three times with or without
the barrier. A while loop is a boundary fusion does not cross, and a loop that XLA cannot
prove runs once is kept: its results are buffers, computed once.

Measured at 1,024 cells x 64 genes on 2 cores: one block of the exact time assignment
7.6-8.4 ms -> 4.1-4.6 ms with the curve evaluated through :func:`evaluate_once` (bitwise the
same times); two Levenberg-Marquardt steps 12.1 -> 7.9 ms with the Jacobian evaluated once.
The price is the last bit: a loop that XLA vectorises leaves a scalar remainder, which may
round differently, so a gene's result can depend on its column in a chunk in the last bit
(``tests/test_hard_em.py::test_regrouped_rounds_equal_one_uninterrupted_run``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def evaluate_once(fn: Callable[..., Any], *args: Any, when: Any = None, otherwise: float = 0.0) -> Any:
    """``fn(*args)``, materialised so that XLA does not recompute it in every consumer.

    Parameters
    ----------
    fn
        A function of arrays returning an array or a pytree of arrays.
    *args
        Its arguments.
    when
        Optional traced boolean: where false, ``fn`` is not evaluated and every value is
        ``otherwise`` (the loop runs no trip).
    otherwise
        The values without an evaluation.

    Returns
    -------
    The value of ``fn(*args)``. It is forward-differentiable (``jvp``, ``linearize``), not
    reverse-differentiable (a while loop); outside ``jit`` it costs a loop of one trip.
    """
    shapes = jax.eval_shape(fn, *args)
    # The loop's flag, not a trip count, ends it: XLA removes loops it can count.
    done = jnp.asarray(False) if when is None else ~jnp.asarray(when)
    init = (done, jax.tree.map(lambda s: jnp.full(s.shape, otherwise, s.dtype), shapes))
    _, value = jax.lax.while_loop(lambda carry: ~carry[0], lambda _: (jnp.asarray(True), fn(*args)), init)
    return value
