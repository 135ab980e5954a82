"""Data sets: a simulator with known truth and the pancreas loader.

``simulate`` draws cells from the kinetics of MODEL.md section 1 and stores the true
parameters and times next to the data; ``pancreas`` reads scVelo's endocrinogenesis data set
from a path, a cache or the web.
"""

from ._pancreas import DatasetUnavailableError, pancreas, shared_pancreas_path
from ._simulate import simulate

__all__ = ["DatasetUnavailableError", "pancreas", "shared_pancreas_path", "simulate"]
