"""Prediction for new data with lme4's semantics (``predict.merMod``).

``X_new b̂ + Σ_terms Z_new û``: the fixed part coded as the fitted data were (same columns,
levels and transform states: ``scale``, ``poly``), each random term's BLUP looked up by the
level of each new row. A level the fit did not see contributes a zero random effect
(``allow_new_levels=True``, lme4's ``allow.new.levels = TRUE``) or raises a ``ValueError``
naming it; a new level of a fixed-effect factor always raises. ``include_random=False`` gives
the population-level prediction ``X_new b̂`` (lme4's ``re.form = NA``). The residual's
correlation (``correlation=``, a ``Grouped`` residual) does not enter, as in nlme's
``predict.lme``. No response column is needed.

>>> import pandas as pd
>>> from covmodules import lmm
>>> df = pd.read_csv("tests/data/sleepstudy.csv", dtype={"Subject": str})
>>> result = lmm("Reaction ~ Days + (Days | Subject)", df)
>>> new = pd.DataFrame({"Days": [0.0, 10.0], "Subject": ["308", "999"]})
>>> result.predict(new).round(3).tolist()      # subject 999 is new: population line
[253.664, 356.078]
>>> result.predict(new, allow_new_levels=False)
Traceback (most recent call last):
...
ValueError: random term 'Subject': level(s) ['999'] of Subject not in the fitted data; \
pass allow_new_levels=True to predict them with a zero random effect
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import SpecError
from .design import fixed_design, random_design
from .expressions import parse_term
from .terms import FormulaDesign

__all__ = ["Source", "Fitted", "predict", "fixed_matrix", "random_part"]


@dataclass
class Source:
    """Where a fit's data came from: the model ``spec`` and the prepared ``frame``."""

    spec: object
    frame: pd.DataFrame


@dataclass
class Fitted:
    """What predictions need of a fit: the ``spec`` and fitted ``frame``, the kept columns
    ``x_names`` of X, ``beta`` and the ``blups`` (term -> levels × coefficients). Saved in
    plain types (:meth:`state_dict`, e.g. in a checkpoint) it predicts without the fit."""

    spec: object
    frame: pd.DataFrame
    x_names: list[str]
    beta: np.ndarray
    blups: dict[str, pd.DataFrame]

    @classmethod
    def from_result(cls, result, source: Source) -> "Fitted":
        return cls(source.spec, source.frame, list(result.objective.x_names),
                   result.state.beta.double().cpu().numpy(), result.blups())

    def predict(self, newdata: pd.DataFrame, allow_new_levels: bool = True,
                include_random: bool = True) -> np.ndarray:
        """``X_new b̂`` plus, with ``include_random``, each term's ``Z_new û``."""
        if not isinstance(newdata, pd.DataFrame):
            raise TypeError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
        if len(newdata) == 0:
            return np.zeros(0)
        spec, frame = self.spec, self.frame
        try:
            new = spec.coded(newdata)
            out = fixed_matrix(spec, frame, new, self.x_names).double().numpy() @ self.beta
            if include_random:
                for name, blups in self.blups.items():
                    out = out + random_part(spec, frame, new, name, blups, allow_new_levels)
        except SpecError as err:
            raise ValueError(str(err)) from None
        except KeyError as err:
            raise ValueError(f"newdata: missing column {err.args[0]!r}") from None
        return out

    def state_dict(self) -> dict:
        """The fit in plain Python types (``torch.load(weights_only=True)`` reads them)."""
        columns = {c: self.frame[c].tolist() for c in self.frame.columns}
        categories = {c: {"categories": self.frame[c].cat.categories.tolist(),
                          "ordered": bool(self.frame[c].cat.ordered)}
                      for c in self.frame.columns
                      if isinstance(self.frame[c].dtype, pd.CategoricalDtype)}
        blups = {name: {"levels": [str(v) for v in b.index], "columns": [str(c) for c in b],
                        "values": b.to_numpy(dtype=np.float64).tolist()}
                 for name, b in self.blups.items()}
        return {"x_names": list(self.x_names), "beta": self.beta.tolist(), "blups": blups,
                "columns": columns, "categories": categories}

    @classmethod
    def from_state_dict(cls, spec, state: dict) -> "Fitted":
        frame = pd.DataFrame(state["columns"])
        for col, c in state["categories"].items():
            frame[col] = pd.Categorical(frame[col], categories=c["categories"],
                                        ordered=c["ordered"])
        blups = {name: pd.DataFrame(b["values"], index=b["levels"], columns=b["columns"])
                 for name, b in state["blups"].items()}
        return cls(spec, frame, list(state["x_names"]), np.asarray(state["beta"], float), blups)


def fixed_matrix(spec, frame: pd.DataFrame, newdata: pd.DataFrame, x_names: list[str]):
    """``X`` of ``newdata``'s rows, coded as ``frame`` (the fitted data) was, with the columns
    ``x_names`` (those the fit kept)."""
    if spec.formula is not None:
        design = FormulaDesign(spec.formula, frame)
        X, names = design.evaluate(newdata), design.names
    else:
        fitted = spec.design(frame)
        for col, levels in fitted.levels.items():
            unseen = sorted({str(v) for v in newdata[col]} - set(levels))
            if unseen:
                raise ValueError(f"{col}: level(s) {unseen} not seen in the data the model "
                                 f"was fitted to (levels {levels})")
        both = pd.concat([frame[newdata.columns.intersection(frame.columns)], newdata],
                         ignore_index=True)
        terms = [parse_term(t, both.columns) for t in spec.fixed]
        design = fixed_design(both, terms, intercept=spec.intercept, levels=fitted.levels)
        X, names = design.matrix[len(frame):], design.names
    return X[:, [names.index(name) for name in x_names]]


def random_part(spec, frame, newdata, name: str, blups: pd.DataFrame,
                allow_new_levels: bool) -> np.ndarray:
    """``Z_new û`` of random term ``name`` (``blups``: levels × coefficients)."""
    term = spec.random[name]
    rd = random_design(newdata, list(term.group), spec.term_specs(name, newdata, frame))
    labels = np.asarray(rd.levels, dtype=object)[rd.group_codes.numpy()]
    known = pd.Index(blups.index.astype(str))
    where = known.get_indexer(labels)
    if not allow_new_levels and (where < 0).any():
        unseen = sorted(set(labels[where < 0]))
        raise ValueError(f"random term {name!r}: level(s) {unseen} of {':'.join(term.group)} "
                         "not in the fitted data; pass allow_new_levels=True to predict them "
                         "with a zero random effect")
    u = np.vstack([blups.to_numpy(dtype=np.float64), np.zeros((1, blups.shape[1]))])
    return (rd.term_matrix.numpy() * u[where]).sum(1)


def predict(result, newdata: pd.DataFrame | None = None, allow_new_levels: bool = True,
            include_random: bool = True) -> np.ndarray:
    """The predictions of :meth:`FitResult.predict` (see the module docstring)."""
    if newdata is None:
        return result.fitted(conditional=include_random)
    if getattr(result, "source", None) is None:
        raise ValueError("predict(newdata) needs a fit built from data: covmodules.lmm, or a "
                         "model spec (ModelSpec / the command line)")
    return Fitted.from_result(result, result.source).predict(newdata, allow_new_levels,
                                                             include_random)
