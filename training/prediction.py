"""What ``predict`` returns: fitted values and residuals per data row, and the BLUP table."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from covmodules.results import FitResult
from covmodules.specs import Problem

from .monitoring import component_blups

__all__ = ["prediction_frame", "blup_table"]


def prediction_frame(problem: Problem, split: str, marginal: np.ndarray,
                     training: Optional[FitResult]) -> pd.DataFrame:
    """The rows of ``problem.frame`` with ``split``, ``fitted_marginal`` (``X b̂``, given),
    ``fitted`` and ``residual``: on training rows ``fitted`` is ``training``'s conditional
    fitted values (``X b̂`` plus the BLUPs of the random terms) followed by the BLUPs of the
    residual's components (:func:`~training.monitoring.component_blups`); held-out rows
    (``training`` ``None``) get the marginal values."""
    out = problem.frame.copy()
    out.insert(0, "split", split)
    out["fitted_marginal"] = marginal
    if training is None:
        out["fitted"] = marginal
    else:
        out["fitted"] = training.fitted(conditional=True)
        for name, values in component_blups(training).items():
            out[name] = values
    out["residual"] = problem.y.double().cpu().numpy() - out["fitted"].to_numpy()
    return out


def blup_table(results: list[FitResult]) -> pd.DataFrame:
    """BLUPs of the random terms of ``results`` (one per training batch), one row per
    (term, level, coefficient)."""
    rows = []
    for result in results:
        for term, frame in result.blups().items():
            for level, values in frame.iterrows():
                rows += [(term, level, coef, value) for coef, value in values.items()]
    return pd.DataFrame(rows, columns=["term", "level", "coefficient", "blup"])
