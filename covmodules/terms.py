"""Model matrices of R formula right-hand sides, built by formulaic with R's semantics.

:class:`FormulaDesign` builds ``model.matrix(~ rhs, data)`` as R does: ``*``, ``:``, ``/``,
``-1``, ``I()``, ``C()``, ``factor()``, ``poly()``, ``scale()``, ``log()``...; treatment
contrasts for unordered factors in their level order (a pandas Categorical's categories, else
sorted values), polynomial contrasts (``contr.poly``: ``.L``, ``.Q``, ``.C``, ``^4``) for
ordered Categoricals; R's column names (``(Intercept)``, ``SexFemale``, ``age:SexFemale``,
``poly(x, 2)1``, ``I(age^2)``). :meth:`FormulaDesign.evaluate` applies the same coding and the
same transform states (``scale``'s centre, ``poly``'s basis, the levels) to new data; a level
the fit did not see is a ``ValueError`` naming it.

>>> import pandas as pd
>>> df = pd.DataFrame({"age": [8.0, 10.0, 8.0, 12.0], "Sex": ["M", "M", "F", "F"]})
>>> d = FormulaDesign("age * Sex + I(age^2)", df)
>>> d.names
['(Intercept)', 'age', 'SexM', 'I(age^2)', 'age:SexM']
>>> d.evaluate(pd.DataFrame({"age": [9.0], "Sex": ["F"]})).tolist()
[[1.0, 9.0, 0.0, 81.0, 0.0]]
>>> d.evaluate(pd.DataFrame({"age": [9.0], "Sex": ["X"]}))
Traceback (most recent call last):
...
ValueError: Sex: level(s) ['X'] not seen in the data the model was fitted to (levels ['F', 'M'])
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import torch
from formulaic import Formula
from formulaic.errors import FormulaicError
from formulaic.transforms.contrasts import C, PolyContrasts
from formulaic.utils.stateful_transforms import stateful_transform

__all__ = ["FormulaDesign", "r_name"]

FUNCTIONS = {"sin": np.sin, "cos": np.cos, "tan": np.tan, "sqrt": np.sqrt, "abs": np.abs,
             "exp": np.exp, "log": np.log, "log2": np.log2, "log10": np.log10, "pi": np.pi}


def _r_label(value) -> str:
    """R's label of a factor level: ``1`` for 1.0, ``TRUE`` for True."""
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


@stateful_transform
def factor(values, _state=None):
    """R's ``factor()``: a categorical with R's labels and level order (sorted values), the
    levels of the fitted data kept for new data."""
    series = pd.Series(np.asarray(values))
    if "levels" not in _state:
        order = sorted(pd.unique(series)) if not isinstance(series.dtype, pd.CategoricalDtype) \
            else list(series.cat.categories)
        _state["levels"] = [_r_label(v) for v in order]
    return C(series.map(_r_label), levels=_state["levels"])


def to_formulaic(rhs: str) -> str:
    """R's right-hand side as formulaic reads it: ``^`` inside parentheses is ``**``."""
    out, depth = [], 0
    for ch in rhs:
        depth += (ch == "(") - (ch == ")")
        out.append("**" if ch == "^" and depth > 0 else ch)
    return "".join(out)


_BRACKET = re.compile(r"^(.*)\[(T\.)?(.*)\]$", re.S)


def r_name(column: str) -> str:
    """R's name of a formulaic column: ``Sex[T.Female]`` is ``SexFemale``, ``t[.L]`` is
    ``t.L``, ``Intercept`` is ``(Intercept)``, ``I(age ** 2)`` is ``I(age^2)``."""
    if column == "Intercept":
        return "(Intercept)"
    parts = []
    for part in _split_colon(column):
        m = _BRACKET.match(part)
        if m:
            part = m.group(1) + m.group(3)
        parts.append(part.replace(" ** ", "^").replace(" / ", "/"))
    return ":".join(parts)


def _split_colon(name: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(name):
        depth += (ch in "([") - (ch in ")]")
        if ch == ":" and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    return parts + [name[start:]]


class FormulaDesign:
    """``model.matrix(~ rhs, frame)`` (see the module docstring): ``matrix`` (float64 tensor),
    ``names`` (R's), ``levels`` (the level order of each factor column used)."""

    def __init__(self, rhs: str, frame: pd.DataFrame):
        self.rhs = rhs
        self.ordered = {c: list(frame[c].cat.categories) for c in frame.columns
                        if isinstance(frame[c].dtype, pd.CategoricalDtype) and frame[c].cat.ordered}
        try:
            formula = Formula(to_formulaic(rhs))
            matrix = formula.get_model_matrix(*self._inputs(frame), na_action="raise")
        except (FormulaicError, NameError, SyntaxError, TypeError, ValueError) as err:
            raise ValueError(f"cannot build the terms {rhs!r}: {_first_line(err)}") from None
        self.spec = matrix.model_spec
        self.columns = list(matrix.columns)
        self.names = [r_name(c) for c in self.columns]
        self.matrix = torch.tensor(np.array(matrix, dtype=np.float64))
        self.levels = self._levels()

    def _levels(self) -> dict[str, list[str]]:
        out = {}
        for name, (kind, state) in self.spec.encoder_state.items():
            if isinstance(state, dict) and "categories" in state:
                out[str(name)] = [str(v) for v in state["categories"]]
        return out

    def _inputs(self, frame: pd.DataFrame):
        """The data and context formulaic evaluates: R's functions, ordered factors coded by
        ``contr.poly`` (in the context, so their levels and contrasts are explicit)."""
        context = {**FUNCTIONS, "factor": factor}
        for col, levels in self.ordered.items():
            if col in frame.columns:
                context[col] = C(frame[col].astype(object), PolyContrasts(), levels=levels)
        return frame.drop(columns=[c for c in self.ordered if c in frame.columns]), context

    def evaluate(self, frame: pd.DataFrame) -> torch.Tensor:
        """The model matrix of new rows, coded as the fitted data were (same columns)."""
        data, context = self._inputs(frame)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                matrix = self.spec.get_model_matrix(data, context=context, na_action="raise")
            except (FormulaicError, NameError, TypeError, ValueError) as err:
                raise ValueError(f"cannot build the terms {self.rhs!r} for the new data: "
                                 f"{_first_line(err)}") from None
        for w in caught:
            if "categories outside of the nominated levels" in str(w.message):
                self._raise_new_level(frame)
        return torch.tensor(np.array(matrix[self.columns], dtype=np.float64))

    def _raise_new_level(self, frame: pd.DataFrame):
        for name, levels in self.levels.items():
            col = name if name in frame.columns else _inner(name)
            if col in frame.columns:
                unseen = sorted({_r_label(v) for v in frame[col]} - set(levels))
                if unseen:
                    raise ValueError(f"{name}: level(s) {unseen} not seen in the data the "
                                     f"model was fitted to (levels {levels})")
        raise ValueError(f"the new data have factor levels not seen in the fit of {self.rhs!r}")


def _inner(name: str) -> str:
    m = re.match(r"^\w+\((\w+)", name)
    return m.group(1) if m else name


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
