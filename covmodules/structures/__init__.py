"""Leaf covariance structures, one per file."""

from .adapter import Adapter
from .ar1 import AR1Matrix
from .block_design import BlockDesignMatrix
from .car1 import CAR1Matrix
from .compound_symmetric import CompoundSymmetricMatrix
from .design_matrix import DesignMatrix
from .diagonal import DiagonalMatrix
from .dummy import DummyMatrix
from .equal_entry import EqualEntryMatrix
from .equicorrelation import EquicorrelationMatrix
from .factor_analytic import FactorAnalyticMatrix
from .heterogeneous import HeterogeneousCSMatrix, HeterogeneousToeplitzMatrix
from .fixed import FixedMatrix
from .identity import IdentityMatrix
from .known import KnownMatrix
from .lower_triangular import LowerTriangularMatrix
from .scalar import ScalarMatrix
from .simple import SimpleMatrix
from .toeplitz import ToeplitzMatrix
from .unconstrained import UnconstrainedMatrix

__all__ = ["Adapter", "AR1Matrix", "BlockDesignMatrix", "CAR1Matrix", "CompoundSymmetricMatrix",
           "DesignMatrix", "DiagonalMatrix", "DummyMatrix", "EqualEntryMatrix",
           "EquicorrelationMatrix", "FactorAnalyticMatrix", "FixedMatrix", "HeterogeneousCSMatrix",
           "HeterogeneousToeplitzMatrix", "IdentityMatrix", "KnownMatrix",
           "LowerTriangularMatrix", "ScalarMatrix", "SimpleMatrix", "ToeplitzMatrix",
           "UnconstrainedMatrix"]
