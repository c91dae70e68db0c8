"""``lmm``: a linear mixed model from an R formula and a DataFrame, fitted in one line.

The steps lme4 keeps apart are separate here too: :func:`lmm_model` builds the model (lme4's
``lFormula``: the covariance module, ``y``, ``X``), :meth:`FormulaModel.objective` the REML /
ML objective (``mkLmerDevfun``), :meth:`FormulaModel.fit` optimises it (``optimizeLmer``);
:func:`lmm` does all three. The formula compiles to a model spec (:mod:`covmodules.specs`;
syntax in :mod:`covmodules.formula`), so a YAML config can give ``formula:`` as well.

>>> import pandas as pd
>>> df = pd.read_csv("tests/data/sleepstudy.csv", dtype={"Subject": str})
>>> result = lmm("Reaction ~ Days + (Days | Subject)", df)
>>> round(result.loglik, 4)
-871.8141
>>> m = lmm_model("Reaction ~ Days + (1 | Subject)", df)
>>> m.x_names, m.model.free_param_names
(['(Intercept)', 'Days'], ['Subject/sigma^2', 'residual/sigma^2'])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .fitting import fit
from .model import MixedModel
from .prediction import Source
from .reml import REML
from .results import FitResult
from .specs import ModelSpec, Problem
from .structures import KnownMatrix

__all__ = ["lmm", "lmm_model", "FormulaModel"]


@dataclass
class FormulaModel:
    """The unfitted model of a formula: ``problem`` (``model``, ``y``, ``X``, ``x_names``,
    ``frame``) and the ``spec`` it was compiled to."""

    spec: ModelSpec
    problem: Problem

    @property
    def model(self) -> MixedModel:
        return self.problem.model

    @property
    def y(self) -> torch.Tensor:
        return self.problem.y

    @property
    def X(self) -> torch.Tensor:
        return self.problem.X

    @property
    def x_names(self) -> list[str]:
        return self.problem.x_names

    def objective(self, reml: bool = True, **kwargs) -> REML:
        """The REML (or ML, ``reml=False``) objective of the model (:class:`~covmodules.REML`)."""
        return REML(self.model, self.y, self.X, x_names=self.x_names,
                    method="reml" if reml else "ml", **kwargs)

    def fit(self, reml: bool = True, **kwargs) -> FitResult:
        """:func:`covmodules.fit` of the model (keywords as there); the result predicts new
        data (:meth:`FitResult.predict`)."""
        result = fit(self.model, self.y, self.X, x_names=self.x_names,
                     method="reml" if reml else "ml", **kwargs)
        result.source = Source(self.spec, self.problem.frame)
        return result


def lmm_model(formula: str, data: pd.DataFrame, correlation: str | None = None,
              weights=None, levels: dict | None = None,
              fix: dict | None = None) -> FormulaModel:
    """The model of ``formula`` on ``data``, unfitted (see :func:`lmm` for the arguments)."""
    config = {"formula": formula, "correlation": correlation, "levels": levels, "fix": fix}
    spec = ModelSpec.from_dict({k: v for k, v in config.items() if v is not None})
    frame = spec.prepare(data)
    problem = spec.problem(frame)
    if weights is not None:
        problem.model = _weighted(problem.model, spec, frame, weights)
    return FormulaModel(spec, problem)


def lmm(formula: str, data: pd.DataFrame, reml: bool = True, correlation: str | None = None,
        weights=None, levels: dict | None = None, fix: dict | None = None,
        **kwargs) -> FitResult:
    """Fit the linear mixed model ``formula`` to ``data`` by REML (``reml=False``: ML).

    Args:
        formula: ``"y ~ fixed + (terms | group) + ..."`` in lme4's syntax, with glmmTMB's
            structured terms (``ar1(0 + factor(t) | g)``, ``cs``, ``us``, ``diag``, ``toep``,
            ``rr(x | g, d = 2)``); the fixed part has R's semantics (formulaic).
        data: a pandas DataFrame; factor levels in R's order are a Categorical's categories
            (ordered Categoricals get polynomial contrasts), else sorted values.
        correlation: the residual's correlation within a group, nlme-style: ``"ar1(1 | g)"``,
            ``"car1(time | g)"``, ``"cs(1 | g)"``, ``"us(1 | g)"``, ``"ar1(row):ar1(col)"``
            (a separable spatial field plus a nugget).
        weights: prior weights as lme4 takes them (residual variance ``sigma^2 / w``): a
            column name or an array; only with the default residual.
        levels: level orders by column (the first is the reference level).
        fix: parameter name -> natural-scale value, held fixed.
        **kwargs: passed to :func:`covmodules.fit` (``optimizer``, ``max_iter``, ...).
    """
    return lmm_model(formula, data, correlation, weights, levels, fix).fit(reml, **kwargs)


def _weighted(model: MixedModel, spec: ModelSpec, frame: pd.DataFrame, weights) -> MixedModel:
    if spec.residual.structure != "scalar":
        raise ValueError("weights: only with the default residual (no correlation)")
    w = frame[weights] if isinstance(weights, str) else weights
    w = np.asarray(w, dtype=np.float64).ravel()
    if w.shape != (len(frame),) or not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"weights: expected {len(frame)} positive finite values")
    random = {name: (model.designs[name], model._modules[name]) for name in model.term_names}
    out = MixedModel(random=random, residual=KnownMatrix(torch.diag(torch.as_tensor(1 / w))))
    out.levels, out.terms = model.levels, model.terms
    return out
