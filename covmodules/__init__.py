"""covmodules: covariance structures for linear mixed models as PyTorch modules."""

from .base import CovarianceFunction, CovarianceModule, ParamSpec, Structure
from .operators import *  # noqa: F401,F403
from .operators import __all__ as _operators
from .structures import *  # noqa: F401,F403
from .structures import __all__ as _structures

__version__ = "0.1.0"
__all__ = ["CovarianceFunction", "CovarianceModule", "ParamSpec", "Structure",
           *_structures, *_operators]
