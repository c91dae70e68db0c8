"""covmodules: covariance structures for linear mixed models as PyTorch modules."""

from .base import CovarianceFunction, CovarianceModule, ParamSpec, Structure
from .checks import Checks
from .fitting import fit
from .inference import anova
from .lmm import FormulaModel, lmm, lmm_model
from .model import MixedModel
from . import transform  # torch-openreml's covariance.transform
from .param import simple_param_specs
from .operators import *  # noqa: F401,F403
from .operators import __all__ as _operators
from .structures import *  # noqa: F401,F403
from .reml import MLLoss, REML, REMLLoss, ml_loss, reml_loss
from .results import FitResult
from .structures import __all__ as _structures
from .layers import __all__ as _layers
from .layers import *  # noqa: F401,F403

__version__ = "0.1.0"
__all__ = ["CovarianceFunction", "CovarianceModule", "ParamSpec", "Structure",
           "MixedModel", "Checks", "fit", "anova", "lmm", "lmm_model", "FormulaModel", "FitResult",
           "REML", "REMLLoss", "MLLoss", "reml_loss", "ml_loss", "simple_param_specs", "transform",
           *_structures, *_operators, *_layers]
