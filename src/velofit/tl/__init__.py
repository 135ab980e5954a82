"""AnnData front door of the tools: fits, velocities, latent time and what builds on them."""

from ._embedding import rank_dynamical_genes, velocity_embedding, velocity_graph
from ._latent_time import latent_time
from ._recover_dynamics import recover_dynamics
from ._shared import recover_dynamics_shared
from ._velocity import velocity

__all__ = [
    "latent_time",
    "rank_dynamical_genes",
    "recover_dynamics",
    "recover_dynamics_shared",
    "velocity",
    "velocity_embedding",
    "velocity_graph",
]
