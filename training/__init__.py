"""Lightning training, TensorBoard monitoring and the command line for covmodules."""

from .callbacks import PredictionWriter
from .data import Batch, MixedModelDataModule, read_table
from .metrics import REMLStatistics
from .module import AIStep, REMLModule

__all__ = ["REMLModule", "AIStep", "MixedModelDataModule", "Batch", "read_table",
           "REMLStatistics", "PredictionWriter"]
