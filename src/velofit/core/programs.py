"""The compiled programs of the per-gene fit, of shapes that do not depend on the data size.

A chunk of ``width`` genes runs

1. the hard EM on its ``n_sample`` iterated cells (``min(n_cells, config.n_jacobian_cells)``):
   :func:`velofit.core.hard_em.start`, then :func:`velofit.core.hard_em.advance` a few
   iterations at a time (the fit regroups unfinished genes between calls), then
2. the final exact time assignment (:func:`velofit.core.hard_em.assign_times`) of every cell,
   in blocks of ``time_block(n_cells)`` cells.

Above 1,024 cells every shape is fixed, so one set of executables serves every dataset
of that width and EM settings, and the disk cache of :mod:`velofit.core.compile_cache` lets
later processes skip compilation. Blocks also keep the final assignment's arrays in the CPU
cache (measured 2x faster than one pass over 5,000 cells) and its memory independent of the
number of cells.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .compile_cache import compiled
from .hard_em import (
    EMCarry,
    EMConfig,
    EMState,
    advance_jit,
    assign_times_jit,
    start_jit,
)
from .mstep import GeneData

#: Cells per block of the final time assignment. Measured at 50,000 cells x 256 genes on 2
#: cores: 1024 cells per block took 4.7 s, 512 took 5.4 s (half as many Python dispatches
#: and host copies per chunk); at 5,000 cells no difference.
TIME_BLOCK_CELLS = 1024


def time_block(n_cells: int) -> int:
    """Cells per block of the final time assignment: :data:`TIME_BLOCK_CELLS`, or all cells if fewer.

    Parameters
    ----------
    n_cells
        Number of cells.

    Returns
    -------
    Block length.
    """
    return min(n_cells, TIME_BLOCK_CELLS)


def _gene_data(n_cells: int, width: int) -> GeneData:
    f64 = jnp.float64
    return GeneData(
        jax.ShapeDtypeStruct((n_cells, width), f64),
        jax.ShapeDtypeStruct((n_cells, width), f64),
        jax.ShapeDtypeStruct((n_cells, width), f64),
        jax.ShapeDtypeStruct((width,), f64),
        jax.ShapeDtypeStruct((width,), f64),
        jax.ShapeDtypeStruct((n_cells,), jnp.int64),
    )


#: Iterations per call of the EM's ``advance`` program (between regroupings of unfinished genes).
ADVANCE_STEPS = 4


def start_program(n_sample: int, width: int, config: EMConfig, device: jax.Device) -> Any:
    """Compiled :func:`velofit.core.hard_em.start`, called as ``f(data, theta0) -> carry``.

    Parameters
    ----------
    n_sample
        Iterated cells.
    width
        Genes per chunk.
    config
        EM settings.
    device
        Device to run on.

    Returns
    -------
    A ``jax.stages.Compiled``.
    """
    theta = jax.ShapeDtypeStruct((5, width), jnp.float64)
    return compiled(start_jit, (_gene_data(n_sample, width), theta), static={"config": config}, device=device)


def advance_program(n_sample: int, width: int, config: EMConfig, device: jax.Device) -> Any:
    """Compiled :func:`velofit.core.hard_em.advance` of :data:`ADVANCE_STEPS` iterations.

    Called as ``f(carry, data) -> (carry, done)``.

    Parameters
    ----------
    n_sample
        Iterated cells.
    width
        Genes per chunk.
    config
        EM settings.
    device
        Device to run on.

    Returns
    -------
    A ``jax.stages.Compiled``.
    """
    data = _gene_data(n_sample, width)
    return compiled(advance_jit, (carry_spec(n_sample, width, config), data),
                    static={"config": config, "n_steps": ADVANCE_STEPS}, device=device)


def carry_spec(n_sample: int, width: int, config: EMConfig) -> EMCarry:
    """Shapes and dtypes of :func:`velofit.core.hard_em.start`'s carry, written out.

    (Tracing ``start`` to learn them costs about a second per process.)

    Parameters
    ----------
    n_sample, width
        Iterated cells and genes per chunk.
    config
        EM settings (the length of the trace).

    Returns
    -------
    :class:`~velofit.core.hard_em.EMCarry` of ``jax.ShapeDtypeStruct``.
    """
    f64, i32 = jnp.float64, jnp.int32

    def spec(shape, dtype=f64):
        return jax.ShapeDtypeStruct(shape, dtype)

    state = EMState(
        theta=spec((5, width)), t=spec((n_sample, width)), loss=spec((width,)), damping=spec((width,)),
        converged=spec((width,), jnp.bool_), n_iter=spec((width,), i32),
    )
    return EMCarry(spec((), i32), spec((), jnp.bool_), spec((), i32), state, spec((config.max_iter + 1, width)))


def times_program(block: int, width: int, config: EMConfig, device: jax.Device) -> Any:
    """Compiled final time assignment, called as ``f(theta, t_prev, data) -> (t, loss)``.

    Parameters
    ----------
    block
        Cells per block.
    width
        Genes per chunk.
    config
        EM settings.
    device
        Device to run on.

    Returns
    -------
    A ``jax.stages.Compiled``.
    """
    theta = jax.ShapeDtypeStruct((5, width), jnp.float64)
    t_prev = jax.ShapeDtypeStruct((block, width), jnp.float64)
    return compiled(assign_times_jit, (theta, t_prev, _gene_data(block, width)), static={"config": config},
                    device=device)
