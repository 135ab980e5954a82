"""Preprocessing as in scVelo: gene filtering, normalisation and first-order moments."""

from ._preprocess import filter_and_normalize, moments

__all__ = ["filter_and_normalize", "moments"]
