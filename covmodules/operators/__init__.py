"""Container modules that compose covariance structures."""

from .base import Operator
from .kronecker import KroneckerProduct
from .sum import Sum

__all__ = ["Operator", "KroneckerProduct", "Sum"]
