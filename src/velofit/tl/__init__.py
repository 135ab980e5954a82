"""AnnData front door of the tools: fit, velocities and latent time."""

from ._recover_dynamics import recover_dynamics
from ._velocity import velocity

__all__ = ["recover_dynamics", "velocity"]
