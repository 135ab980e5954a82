"""Figures: each function takes an AnnData and returns a matplotlib Figure (never shows it)."""

from ._embedding import latent_time, velocity_embedding_stream
from ._phase import loss_trace, phase_portrait

__all__ = ["latent_time", "loss_trace", "phase_portrait", "velocity_embedding_stream"]
