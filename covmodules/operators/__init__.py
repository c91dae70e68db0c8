"""Container modules that compose covariance structures."""

from .augment import Augment
from .base import Operator
from .block_diagonal import BlockDiagonal
from .gram import Gram
from .grouped import Grouped
from .hadamard import HadamardProduct
from .kronecker import KroneckerProduct
from .propagation import CovariancePropagation
from .sum import Sum

__all__ = ["Operator", "KroneckerProduct", "Sum", "BlockDiagonal", "HadamardProduct",
           "CovariancePropagation", "Gram", "Augment", "Grouped"]
