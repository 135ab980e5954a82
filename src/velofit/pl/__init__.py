"""Figures: each function takes an AnnData and returns a matplotlib Figure (never shows it)."""

from ._embedding import latent_time, velocity_embedding_stream
from ._phase import loss_trace, phase_portrait
from ._time import loglik, posterior, time_prior

__all__ = ["latent_time", "loglik", "loss_trace", "phase_portrait", "posterior", "time_prior", "velocity_embedding_stream"]
