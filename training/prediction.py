"""What ``predict`` returns: predictions per data row from the fitted ``b̂`` and BLUPs (which a
fit's last checkpoint holds, :func:`fitted_state`), and the BLUP table."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch

from covmodules.prediction import Fitted
from covmodules.results import FitResult
from covmodules.specs import SpecError

from .data import split_of

__all__ = ["prediction_frame", "blup_table", "saved_blup_table", "blups_by_term",
           "fitted_state", "predict_rows", "own_data_frame"]


def prediction_frame(frame: pd.DataFrame, split, marginal: np.ndarray, fitted: np.ndarray,
                     y: Optional[np.ndarray]) -> pd.DataFrame:
    """The rows of ``frame`` with ``split``, ``fitted_marginal`` (``X b̂``), ``fitted`` (plus
    the BLUPs of the random terms) and, when the response ``y`` is known, ``residual``."""
    out = frame.copy()
    out.insert(0, "split", split)
    out["fitted_marginal"] = marginal
    out["fitted"] = fitted
    if y is not None:
        out["residual"] = y - fitted
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


def saved_blup_table(state: dict) -> pd.DataFrame:
    """:func:`blup_table` of the BLUPs a :func:`fitted_state` holds."""
    return pd.DataFrame([(t, lv, c, v) for t, b in state["blups"].items()
                         for lv, row in zip(b["levels"], b["values"])
                         for c, v in zip(b["columns"], row)],
                        columns=["term", "level", "coefficient", "blup"])


def blups_by_term(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """:func:`blup_table`'s rows as one levels × coefficients frame per term."""
    out = {}
    for term, rows in table.groupby("term", sort=False):
        wide = rows.pivot(index="level", columns="coefficient", values="blup")
        out[term] = wide.loc[pd.unique(rows.level), list(pd.unique(rows.coefficient))]
    return out


def fitted_state(module, datamodule) -> Optional[dict]:
    """What a checkpoint keeps for ``predict`` (plain types): ``b̂``, the BLUPs and the fitted
    data of :class:`covmodules.prediction.Fitted`, and the groups of each split; ``None``
    without a :class:`~training.MixedModelDataModule`."""
    if getattr(datamodule, "spec", None) is None or datamodule.frame is None:
        return None
    fitted = Fitted(datamodule.spec, datamodule.frame, list(module.objective.x_names),
                    module.result.state.beta.double().cpu().numpy(),
                    blups_by_term(module.blup_table()))
    group = datamodule.group
    return {**fitted.state_dict(), "splits": datamodule.split_labels,
            "group": [group] if isinstance(group, str) else group}


def predict_rows(state: dict, spec, frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`prediction_frame` of new rows from a :func:`fitted_state` (no response needed;
    a row of a group the fit did not see gets a zero random effect, split ``"new"``)."""
    fitted = Fitted.from_state_dict(spec, state)
    try:
        marginal = fitted.predict(frame, include_random=False)
        conditional = fitted.predict(frame)
    except ValueError as err:
        raise SpecError(f"data.path: {err}") from None
    response = frame.get(spec.response)
    y = (response.to_numpy(dtype=np.float64) if response is not None
         and pd.api.types.is_numeric_dtype(response) else None)
    return prediction_frame(frame, split_of(spec, frame, state["group"], state["splits"]),
                            marginal, conditional, y)


def own_data_frame(result: FitResult, X: torch.Tensor, y: torch.Tensor, frame: pd.DataFrame
                   ) -> pd.DataFrame:
    """:func:`prediction_frame` of a module fitted on its own ``y`` and ``X`` (no spec)."""
    marginal = (X.double().cpu() @ result.state.beta).numpy()
    return prediction_frame(frame, "train", marginal, result.fitted(conditional=True),
                            y.double().cpu().numpy())
