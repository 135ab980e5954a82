"""Pure array code of the dynamical model: kinetics, time assignment, EM (no AnnData, no I/O)."""

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
