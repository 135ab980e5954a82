"""Pure array code of the dynamical model: kinetics, time assignment, EM (no AnnData, no I/O)."""

from .._heap import limit_arenas

# Before any of velofit's modules starts JAX (and its threads, whose heaps would keep freed
# memory resident): see velofit._heap.
limit_arenas()

from .fit import GeneFit, fit_genes
from .hard_em import EMConfig, EMState
from .kinetics import (
    KineticParams,
    phase_state,
    spliced,
    trajectory,
    unspliced,
    velocities,
)

__all__ = [
    "EMConfig",
    "EMState",
    "GeneFit",
    "KineticParams",
    "fit_genes",
    "phase_state",
    "spliced",
    "trajectory",
    "unspliced",
    "velocities",
]
