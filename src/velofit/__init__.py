"""velofit: fast, vectorised fitting of the dynamical model of RNA velocity.

``import velofit as vf`` then ``vf.pp`` (preprocessing), ``vf.tl`` (fits, velocity, latent
time), ``vf.pl`` (figures) and ``vf.datasets`` (simulator with known truth, pancreas loader).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = ("core", "datasets", "pl", "pp", "tl")

__all__ = ["__version__", "core", "datasets", "pl", "pp", "tl"]


def __getattr__(name: str) -> Any:
    # Subpackages load on first use: ``import velofit`` stays light and JAX loads only when needed.
    if name in _SUBPACKAGES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
