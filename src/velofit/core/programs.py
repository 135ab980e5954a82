"""The compiled program of the per-gene fit, of a shape that does not depend on the data size.

A chunk of ``width`` genes runs one program, :func:`velofit.core.hard_em.fit_step`, on
``n_sample`` rows (``min(n_cells, config.n_jacobian_cells)``, :func:`program_rows`):

1. the hard EM on the iterated cells: :func:`velofit.core.hard_em.start` and a first few
   iterations, then :func:`velofit.core.hard_em.advance` a few iterations at a time (the
   fit regroups unfinished genes between calls), then
2. the final exact time assignment (:func:`velofit.core.hard_em.assign_times`) of every cell,
   in blocks of ``n_sample`` cells, with the learned time prior's grid penalty
   (:mod:`velofit.core.time_prior`) or none (the nearest point).

XLA compiles a program in seconds, most of a small fit's time. Compiled as three programs
(start, advance, time assignment) the fit took 7.0 s to trace and compile at 64 genes
on 2 cores; one program that branches between them takes 4.7 s, about the largest alone. Above
1,024 cells the shape is fixed, so one executable serves every dataset of that width and EM
settings, and the disk cache of :mod:`velofit.core.compile_cache` lets later processes skip
compilation. Blocks also keep the final assignment's arrays in the CPU cache (measured 2x
faster than one pass over 5,000 cells) and its memory independent of the number of cells.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .compile_cache import compiled
from .hard_em import EMCarry, EMConfig, EMState, fit_step_jit
from .mstep import GeneData

#: Iterations per call of the EM's ``advance`` (between regroupings of unfinished genes).
ADVANCE_STEPS = 4


def program_rows(n_cells: int, config: EMConfig) -> int:
    """Rows of the fit's program: the cells the EM iterates on, and the cells per block of
    the final time assignment (so that both run one compiled program).

    Parameters
    ----------
    n_cells
        Number of cells.
    config
        EM settings (``n_jacobian_cells``).

    Returns
    -------
    ``min(n_cells, config.n_jacobian_cells)``.
    """
    return min(n_cells, config.n_jacobian_cells)


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


def fit_program(n_rows: int, width: int, config: EMConfig, device: jax.Device) -> Any:
    """Compiled :func:`velofit.core.hard_em.fit_step` (advancing :data:`ADVANCE_STEPS` iterations).

    Called as ``f(carry, data, theta0, penalty, begin, final) -> (carry, done)``.

    Parameters
    ----------
    n_rows
        Rows (cells) of the data; :func:`program_rows` in the fit.
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
    flag = jax.ShapeDtypeStruct((), jnp.bool_)
    args = (carry_spec(n_rows, width, config), _gene_data(n_rows, width), jax.ShapeDtypeStruct((5, width), jnp.float64),
            jax.ShapeDtypeStruct(no_penalty(width, config).shape, jnp.float64), flag, flag)
    # The time prior only changes the penalty the program is given: one executable serves both settings.
    em_only = config._replace(time_prior=EMConfig._field_defaults["time_prior"])
    return compiled(fit_step_jit, args, static={"config": em_only, "n_steps": ADVANCE_STEPS}, device=device)


def no_penalty(width: int, config: EMConfig) -> np.ndarray:
    """The grid penalty of the EM's own iterations and of nearest-point timing: zeros.

    Parameters
    ----------
    width
        Genes per chunk.
    config
        EM settings (``n_grid``).

    Returns
    -------
    ``(2, config.n_grid, width)`` float64 zeros (a NumPy array: no program is compiled to make it).
    """
    return np.zeros((2, config.n_grid, width))


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
        theta=spec((5, width)), t=spec((n_sample, width)), loss=spec((width,)), damping=spec((2, width)),
        converged=spec((width,), jnp.bool_), n_iter=spec((width,), i32),
    )
    return EMCarry(spec((), i32), spec((), jnp.bool_), spec((), i32), state, spec((config.max_iter + 1, width)))
