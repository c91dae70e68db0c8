"""Leaf covariance structures, one per file."""

from .ar1 import AR1Matrix
from .fixed import FixedMatrix
from .identity import IdentityMatrix
from .scalar import ScalarMatrix

__all__ = ["AR1Matrix", "FixedMatrix", "IdentityMatrix", "ScalarMatrix"]
