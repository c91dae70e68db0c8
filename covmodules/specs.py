"""Model specs: a config (dict or YAML) that names columns and structures, built into a model.

A spec is the formula of lme4 / nlme / ASReml written as data:

.. code-block:: yaml

    response: follicles
    fixed: ["sin(2 * pi * Time)", "cos(2 * pi * Time)"]   # columns, "a:b", expressions
    random:                                   # term name -> grouping, terms, structure of G
      Mare: {group: Mare}                     # (1 | Mare)
    residual: {structure: ar1, subject: Mare} # nlme corAR1(form = ~ 1 | Mare)
    fix: {}                                   # parameter name -> natural-scale value

:meth:`ModelSpec.build` turns it and a DataFrame into a :class:`Problem`: the
:class:`~covmodules.MixedModel`, ``y``, ``X`` and the column names of ``X``, ready for
:func:`covmodules.fit`. Mistakes raise :class:`SpecError` with a one-line message that names
the key (``residual.structure: unknown structure 'ar2' ...``).

Residual structures (``residual: <name>`` or ``{structure: <name>, <index columns>}``):

=================  ==============  ===========================================================
name               index columns   covariance of the residuals
=================  ==============  ===========================================================
``scalar``                         ``sigma^2 I``
``identity``                       ``I``
``ar1``            subject, time   AR(1) within each subject (time: levels of a column, equally
                                   spaced; default: row order within the subject)
``cs``             subject, time   compound symmetry within each subject
``us``             subject, time   unstructured within each subject
``diag``           subject, time   one variance per time level within each subject
``car1``           subject, time   continuous-time AR(1) on the values of ``time`` (required)
``ar1xar1_nugget`` row, col        ``sigma^2_f AR1(row) ⊗ AR1(col) + sigma^2_n I`` on a complete
                                   grid; rows are sorted row-major, ``field/col/sigma^2 = 1``
=================  ==============  ===========================================================

Random terms take ``group`` (a column or a list: their interaction), ``terms`` (``"1"`` for the
intercept, numeric columns or expressions; default ``["1"]``) and ``structure`` of the
within-level covariance of the terms: ``scalar``, ``diag``, ``us`` (default for several terms)
or ``cs``.

>>> import pandas as pd
>>> df = pd.DataFrame({"y": [1.0, 3.0, 2.0, 5.0, 4.0, 6.0], "x": [0.0, 1, 0, 1, 0, 1],
...                    "g": ["a", "a", "b", "b", "c", "c"]})
>>> problem = ModelSpec.from_dict({"response": "y", "fixed": ["x"],
...                                "random": {"g": {"group": "g"}}}).build(df)
>>> problem.x_names, problem.model.free_param_names
(['(Intercept)', 'x'], ['g/sigma^2', 'residual/sigma^2'])
>>> ModelSpec.from_dict({"response": "y", "residual": "ar2"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
covmodules.specs.SpecError: residual.structure: unknown structure 'ar2'; choose one of [...]
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from .design import fixed_design, grouping, positions_within_group, random_design
from .model import MixedModel
from .operators import Grouped, KroneckerProduct, Sum
from .structures import (AR1Matrix, CAR1Matrix, CompoundSymmetricMatrix, DiagonalMatrix,
                         IdentityMatrix, ScalarMatrix, UnconstrainedMatrix)

__all__ = ["SpecError", "ModelSpec", "RandomSpec", "ResidualSpec", "Problem", "TimeAxis",
           "RESIDUAL_STRUCTURES", "RANDOM_STRUCTURES"]

RESIDUAL_STRUCTURES = {"scalar": (), "identity": (), "ar1": ("subject", "time"),
                       "cs": ("subject", "time"), "us": ("subject", "time"),
                       "diag": ("subject", "time"), "car1": ("subject", "time"),
                       "ar1xar1_nugget": ("row", "col")}
REQUIRED_INDEX = {"car1": ("time",), "ar1xar1_nugget": ("row", "col")}
RANDOM_STRUCTURES = ("scalar", "diag", "us", "cs")
SPEC_KEYS = ("response", "fixed", "intercept", "levels", "factors", "random", "residual", "fix")

_FUNCTIONS = {"sin": np.sin, "cos": np.cos, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
              "abs": np.abs}
_CONSTANTS = {"pi": np.pi}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class SpecError(ValueError):
    """A spec, or the data it is applied to, is malformed; the message names the key."""


@dataclass(frozen=True)
class RandomSpec:
    """A random term ``(terms | group)`` with the within-level covariance ``structure``."""

    group: tuple[str, ...]
    terms: tuple[str, ...] = ("1",)
    structure: str = "scalar"


@dataclass(frozen=True)
class ResidualSpec:
    """The residual structure and its index columns (``subject``, ``time``, ``row``, ``col``)."""

    structure: str = "scalar"
    index: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str):
        return self.index.get(key)


@dataclass
class Problem:
    """What :func:`covmodules.fit` needs: ``model``, ``y``, ``X``, ``x_names``; plus the rows
    of the data they were built from (``frame``, in model order)."""

    model: MixedModel
    y: torch.Tensor
    X: torch.Tensor
    x_names: list[str]
    frame: pd.DataFrame


def _fail(message: str):
    raise SpecError(message)


def _strings(value, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        _fail(f"{key}: expected a column name or a list of them, got {value!r}")
    return tuple(value)


def _mapping(value, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(f"{key}: expected a mapping, got {value!r}")
    return dict(value)


@dataclass(frozen=True)
class ModelSpec:
    """A linear mixed model named by columns and structures (see the module docstring).

    ``prefix`` is prepended to the keys named in error messages (``"data."`` in a CLI config).
    """

    response: str
    fixed: tuple[str, ...] = ()
    intercept: bool = True
    levels: dict[str, list] = field(default_factory=dict)
    factors: tuple[str, ...] = ()
    random: dict[str, RandomSpec] = field(default_factory=dict)
    residual: ResidualSpec = field(default_factory=ResidualSpec)
    fix: dict[str, float] = field(default_factory=dict)
    prefix: str = ""

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, config: Mapping, prefix: str = "") -> "ModelSpec":
        """Validate a config dict (keys as in the module docstring) into a spec."""
        config = _mapping(config, prefix.rstrip(".") or "spec")
        unknown = [k for k in config if k not in SPEC_KEYS]
        if unknown:
            _fail(f"{prefix}{unknown[0]}: unexpected key; the spec keys are {list(SPEC_KEYS)}")
        if not isinstance(config.get("response"), str) or not config["response"]:
            _fail(f"{prefix}response: the response column name is required")
        intercept = config.get("intercept", True)
        if not isinstance(intercept, bool):
            _fail(f"{prefix}intercept: expected true or false, got {intercept!r}")
        levels = _mapping(config.get("levels"), f"{prefix}levels")
        for col, order in levels.items():
            if not isinstance(order, (list, tuple)) or not order:
                _fail(f"{prefix}levels.{col}: expected a non-empty list of levels, got {order!r}")
        fix = _mapping(config.get("fix"), f"{prefix}fix")
        for name, value in fix.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _fail(f"{prefix}fix.{name}: expected a number, got {value!r}")
        random = {name: _random_spec(name, term, f"{prefix}random.{name}")
                  for name, term in _mapping(config.get("random"), f"{prefix}random").items()}
        return cls(response=config["response"],
                   fixed=_strings(config.get("fixed", ()), f"{prefix}fixed"),
                   intercept=intercept, levels={k: list(v) for k, v in levels.items()},
                   factors=_strings(config.get("factors", ()), f"{prefix}factors"),
                   random=random,
                   residual=_residual_spec(config.get("residual", "scalar"), f"{prefix}residual"),
                   fix={k: float(v) for k, v in fix.items()}, prefix=prefix)

    # ------------------------------------------------------------------ building
    def prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        """Check the columns the spec names and return the rows in model order (a grid
        residual sorts them row-major); ``factors`` become string columns."""
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"data must be a pandas DataFrame, got {type(df).__name__}")
        if len(df) == 0:
            _fail(f"{self.prefix}data: no rows")
        p = self.prefix
        self._column(df, self.response, f"{p}response")
        if not pd.api.types.is_numeric_dtype(df[self.response]):
            _fail(f"{p}response: column {self.response!r} must be numeric, "
                  f"got dtype {df[self.response].dtype}")
        for col in (*self.factors, *self.levels):
            self._column(df, col, f"{p}factors" if col in self.factors else f"{p}levels")
        for term in self.fixed:
            _term(term, df.columns, f"{p}fixed")
        for name, r in self.random.items():
            for col in r.group:
                self._column(df, col, f"{p}random.{name}.group")
            for term in r.terms:
                if term != "1":
                    _term(term, df.columns, f"{p}random.{name}.terms")
        for key, col in self.residual.index.items():
            self._column(df, col, f"{p}residual.{key}")
        frame = df.copy()
        for col in self.factors:
            frame[col] = frame[col].astype(str)
        if self.residual.structure == "ar1xar1_nugget":
            frame = frame.sort_values([self.residual.get("row"), self.residual.get("col")],
                                      kind="stable")
        return frame

    def design(self, frame: pd.DataFrame):
        """The fixed-effects design (:class:`covmodules.design.Design`) of ``frame``."""
        terms = [_term(t, frame.columns, f"{self.prefix}fixed") for t in self.fixed]
        try:
            return fixed_design(frame, terms, intercept=self.intercept, levels=self.levels)
        except (ValueError, TypeError) as err:
            _fail(f"{self.prefix}fixed: {err}")

    def response_vector(self, frame: pd.DataFrame) -> torch.Tensor:
        y = frame[self.response].to_numpy(dtype=np.float64)
        if not np.isfinite(y).all():
            _fail(f"{self.prefix}response: column {self.response!r} has "
                  f"{int((~np.isfinite(y)).sum())} missing or infinite value(s)")
        return torch.tensor(y)

    def covariance(self, frame: pd.DataFrame, axis: "TimeAxis | None" = None) -> MixedModel:
        """The covariance model ``V = Σ Z G Zᵀ + R`` of the rows of ``frame``.

        ``axis`` (:meth:`time_axis` of the data ``frame``'s rows come from, restricted to
        them) gives the residual's time positions and size; by default those of ``frame``."""
        random = {name: self._random_term(name, r, frame) for name, r in self.random.items()}
        model = MixedModel(random=random, residual=self._residual(frame, axis))
        for name, value in self.fix.items():
            if name not in model.param_names:
                _fail(f"{self.prefix}fix.{name}: unknown parameter; the model's parameters "
                      f"are {model.param_names}")
            try:
                model.fix(name, value)
            except ValueError as err:
                _fail(f"{self.prefix}fix.{name}: {err}")
        return model

    def problem(self, frame: pd.DataFrame, rows=None, design=None,
                axis: "TimeAxis | None" = None) -> Problem:
        """The :class:`Problem` of ``frame`` (prepared), or of its positional ``rows``.

        ``design`` and ``axis`` (:meth:`design` and :meth:`time_axis` of all of ``frame``,
        built once when many subsets are taken) keep the columns of X and the residual's time
        positions the same across row subsets, so every batch of whole groups has the
        parameters, and the structure, of the whole data."""
        design = self.design(frame) if design is None else design
        X = design.matrix
        if rows is not None:
            axis = self.time_axis(frame) if axis is None else axis
            rows = np.asarray(rows)
            index = torch.as_tensor(rows, dtype=torch.long)
            frame, X = frame.iloc[rows], X[index]
            axis = None if axis is None else axis.take(index)
        return Problem(self.covariance(frame, axis), self.response_vector(frame), X,
                       list(design.names), frame)

    def build(self, df: pd.DataFrame) -> Problem:
        """Prepare ``df`` and build its :class:`Problem`."""
        return self.problem(self.prepare(df))

    def groups(self, frame: pd.DataFrame, group=None) -> tuple[torch.Tensor, list[str]]:
        """Codes and labels of independent blocks of rows (``V`` is block diagonal over them).

        ``group`` names the grouping columns; by default the coarsest grouping among the random
        terms and the residual subject that nests all the others. Rows form one block when the
        residual couples all rows (a grid, a series without subject) or groupings cross.
        """
        coupled = self.residual.structure == "ar1xar1_nugget" or (
            self.residual.structure not in ("scalar", "identity")
            and self.residual.get("subject") is None)
        candidates = [r.group for r in self.random.values()]
        if self.residual.get("subject") is not None:
            candidates.append(_strings(self.residual.get("subject"), "subject"))
        n = len(frame)
        if group is not None:
            group = _strings(group, f"{self.prefix}group")
            for col in group:
                self._column(frame, col, f"{self.prefix}group")
            codes, labels = grouping(frame, list(group))
            if len(labels) > 1 and coupled:
                _fail(f"{self.prefix}group: the residual structure "
                      f"{self.residual.structure!r} couples rows across groups {group}")
            for other in candidates:
                if not _nested(frame, other, codes):
                    _fail(f"{self.prefix}group: grouping {list(other)} is not nested in "
                          f"{list(group)}, so groups are not independent")
            return codes, labels
        if coupled:
            return torch.zeros(n, dtype=torch.long), ["(all)"]
        if not candidates:
            return torch.arange(n), [str(i) for i in frame.index]
        for c in candidates:
            codes, labels = grouping(frame, list(c))
            if all(_nested(frame, other, codes) for other in candidates):
                return codes, labels
        return torch.zeros(n, dtype=torch.long), ["(all)"]

    # ------------------------------------------------------------------ pieces
    def _column(self, df, col, key):
        if col not in df.columns:
            _fail(f"{key}: unknown column {col!r}; the data has columns {list(df.columns)}")

    def _random_term(self, name, r: RandomSpec, frame):
        terms = [t if t == "1" else _term(t, frame.columns, f"{self.prefix}random.{name}.terms")
                 for t in r.terms]
        group = list(r.group)
        order = self.levels.get(group[0]) if len(group) == 1 else None
        try:
            rd = random_design(frame, group if len(group) > 1 else group[0], terms, levels=order)
        except (ValueError, TypeError) as err:
            _fail(f"{self.prefix}random.{name}: {err}")
        k, levels = rd.num_terms, IdentityMatrix(rd.num_levels)
        if k == 1:
            return rd, ScalarMatrix(rd.num_levels)
        leaf = {"scalar": ScalarMatrix, "diag": DiagonalMatrix, "us": UnconstrainedMatrix,
                "cs": CompoundSymmetricMatrix}[r.structure](k)
        return rd, KroneckerProduct(levels=levels, terms=leaf)

    def time_axis(self, frame: pd.DataFrame) -> "TimeAxis | None":
        """Each row's subject and position on the within-subject residual's time axis, and
        the axis size (``None`` for residuals without one): levels of ``time`` (its values for
        ``car1``), else the row order within the subject."""
        s, n, key = self.residual.structure, len(frame), f"{self.prefix}residual"
        if s in ("scalar", "identity", "ar1xar1_nugget"):
            return None
        subject, time = self.residual.get("subject"), self.residual.get("time")
        codes = (grouping(frame, list(_strings(subject, key)))[0] if subject is not None
                 else torch.zeros(n, dtype=torch.long))
        if time is None:
            positions, times = positions_within_group(codes), None
        else:
            values = frame[time].to_numpy()
            if s == "car1" and not pd.api.types.is_numeric_dtype(frame[time]):
                _fail(f"{key}.time: column {time!r} must be numeric for car1")
            times, inverse = np.unique(values, return_inverse=True)
            positions = torch.as_tensor(inverse.ravel(), dtype=torch.long)
        pairs = codes * (int(positions.max()) + 1) + positions
        if torch.unique(pairs).numel() != n:
            where = f" of subject column {subject!r}" if subject is not None else ""
            _fail(f"{key}.time: two rows{where} share the same time {time!r}; "
                  "each subject needs distinct times (or name a subject column)")
        return TimeAxis(codes, positions, int(positions.max()) + 1, times)

    def _residual(self, frame, axis=None):
        s, n, key = self.residual.structure, len(frame), f"{self.prefix}residual"
        if s == "scalar":
            return ScalarMatrix(n)
        if s == "identity":
            return IdentityMatrix(n)
        if s == "ar1xar1_nugget":
            return _grid_model(frame, self.residual.get("row"), self.residual.get("col"), key)
        axis = self.time_axis(frame) if axis is None else axis
        if s == "car1":
            leaf = CAR1Matrix(torch.as_tensor(axis.times, dtype=torch.float64))
        else:
            leaf = {"ar1": AR1Matrix, "cs": CompoundSymmetricMatrix, "us": UnconstrainedMatrix,
                    "diag": DiagonalMatrix}[s](axis.size)
        return Grouped(within=leaf, groups=axis.subjects, positions=axis.positions)


@dataclass(frozen=True)
class TimeAxis:
    """The residual's time axis: each row's subject code and position in ``0..size-1`` and,
    for ``car1``, the ``times`` the positions stand for."""

    subjects: torch.Tensor
    positions: torch.Tensor
    size: int
    times: np.ndarray | None = None

    def take(self, rows: torch.Tensor) -> "TimeAxis":
        """The axis of a subset of the rows (same size and times)."""
        return TimeAxis(self.subjects[rows], self.positions[rows], self.size, self.times)


def _random_spec(name: str, term, key: str) -> RandomSpec:
    if "/" in name or "." in name or name == "residual":
        _fail(f"{key}: a random term name must not contain '/' or '.' nor be 'residual'")
    term = _mapping(term, key)
    unknown = [k for k in term if k not in ("group", "terms", "structure")]
    if unknown:
        _fail(f"{key}.{unknown[0]}: unexpected key; a random term takes group, terms, structure")
    if "group" not in term:
        _fail(f"{key}.group: the grouping column(s) are required")
    terms = term.get("terms", ["1"])
    terms = (terms,) if isinstance(terms, str) else tuple(str(t) for t in terms)
    if not terms:
        _fail(f"{key}.terms: at least one term is required")
    structure = term.get("structure", "us" if len(terms) > 1 else "scalar")
    if structure not in RANDOM_STRUCTURES:
        _fail(f"{key}.structure: unknown structure {structure!r} for a random term; "
              f"choose one of {list(RANDOM_STRUCTURES)}")
    return RandomSpec(_strings(term["group"], f"{key}.group"), terms, structure)


def _residual_spec(value, key: str) -> ResidualSpec:
    config = {"structure": value} if isinstance(value, str) else _mapping(value, key)
    if "structure" not in config:
        _fail(f"{key}.structure: the residual structure is required")
    structure = config.pop("structure")
    if structure not in RESIDUAL_STRUCTURES:
        _fail(f"{key}.structure: unknown structure {structure!r}; "
              f"choose one of {list(RESIDUAL_STRUCTURES)}")
    allowed = RESIDUAL_STRUCTURES[structure]
    for k, v in config.items():
        if k not in allowed:
            extra = f" (it takes {', '.join(allowed)})" if allowed else " (it takes none)"
            _fail(f"{key}.{k}: unexpected key for structure {structure!r}{extra}")
        if k != "subject" and not isinstance(v, str):
            _fail(f"{key}.{k}: expected a column name, got {v!r}")
        if k == "subject":
            _strings(v, f"{key}.{k}")
    for k in REQUIRED_INDEX.get(structure, ()):
        if k not in config:
            _fail(f"{key}.{k}: structure {structure!r} needs the {k} column")
    return ResidualSpec(structure, config)


def _grid_model(frame, row, col, key):
    rows, r_codes = np.unique(frame[row].to_numpy(), return_inverse=True)
    cols, c_codes = np.unique(frame[col].to_numpy(), return_inverse=True)
    n, R, C = len(frame), len(rows), len(cols)
    if n != R * C:
        _fail(f"{key}: ar1xar1_nugget needs one row per cell of a complete {row} x {col} grid; "
              f"found {n} rows for {R} x {C} = {R * C} cells")
    if not np.array_equal(r_codes.ravel() * C + c_codes.ravel(), np.arange(n)):
        _fail(f"{key}: rows must be in row-major grid order (sorted by {row}, then {col}) "
              "with one row per cell; use ModelSpec.prepare")
    model = Sum(field=KroneckerProduct(row=AR1Matrix(R), col=AR1Matrix(C)), nugget=ScalarMatrix(n))
    model.fix("field/col/sigma^2", 1.0)
    return model


def _nested(frame, columns, codes) -> bool:
    """Whether every level of the grouping ``columns`` lies within one block of ``codes``."""
    inner = grouping(frame, list(columns))[0]
    pairs = torch.unique(torch.stack([inner, codes]), dim=1)
    return pairs.shape[1] == int(inner.max()) + 1


def _term(text: str, columns, key: str):
    """A fixed or random term: a column, an interaction ``a:b``, or ``(text, function)``."""
    if text in columns or (":" in text and all(p in columns for p in text.split(":"))):
        return text
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        _fail(f"{key}: unknown column or malformed expression {text!r}; "
              f"the data has columns {list(columns)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in columns and node.id not in _CONSTANTS \
                and node.id not in _FUNCTIONS:
            _fail(f"{key}: unknown column {node.id!r} in term {text!r}; "
                  f"the data has columns {list(columns)}")
        if not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name,
                                 ast.Constant, ast.Load, *_BINARY, *_UNARY)):
            _fail(f"{key}: unsupported syntax in term {text!r}: use columns, numbers, + - * / "
                  f"**, pi and {sorted(_FUNCTIONS)}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name)
                                               and node.func.id in _FUNCTIONS):
            _fail(f"{key}: unknown function in term {text!r}; use one of {sorted(_FUNCTIONS)}")
    return text, lambda df, body=tree.body: np.asarray(_evaluate(body, df), dtype=np.float64)


def _evaluate(node, df):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _CONSTANTS[node.id] if node.id in _CONSTANTS else df[node.id].to_numpy(float)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, df), _evaluate(node.right, df))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, df))
    return _FUNCTIONS[node.func.id](*[_evaluate(a, df) for a in node.args])
