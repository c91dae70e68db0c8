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
intercept, numeric columns or expressions; default ``["1"]``) or ``formula`` (a formula's
terms, ``"0 + factor(t)"``), and ``structure`` of the within-level covariance of the terms:
``scalar``, ``diag``, ``us`` (default for several terms), ``cs``, ``hcs`` (heterogeneous
compound symmetry), ``toep`` (heterogeneous Toeplitz), ``ar1`` or ``rr`` (reduced rank,
``rank`` columns).

``formula: "y ~ x + (1 | g)"`` (and ``correlation: "ar1(1 | g)"``) gives the model as an R
formula instead (:mod:`covmodules.formula`): it sets ``response``, the fixed part (built by
formulaic, :mod:`covmodules.terms`), ``random`` and ``residual``; a ``random`` entry then
changes only the keys it names of the formula's term.

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
covmodules.config.SpecError: residual.structure: unknown structure 'ar2'; choose one of [...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from .config import SpecError, fail, mapping, names
from .design import Design, fixed_design, grouping, random_design
from .expressions import parse_term
from .formula import compile_formula
from .model import MixedModel
from .operators import Gram, KroneckerProduct
from .residuals import RESIDUAL_STRUCTURES, ResidualSpec, TimeAxis
from .structures import (AR1Matrix, CompoundSymmetricMatrix, DiagonalMatrix,
                         HeterogeneousCSMatrix, HeterogeneousToeplitzMatrix, IdentityMatrix,
                         LowerTriangularMatrix, ScalarMatrix, UnconstrainedMatrix)
from .terms import FormulaDesign

__all__ = ["SpecError", "ModelSpec", "RandomSpec", "ResidualSpec", "Problem", "TimeAxis",
           "RESIDUAL_STRUCTURES", "RANDOM_STRUCTURES"]

RANDOM_STRUCTURES = ("scalar", "diag", "us", "cs", "hcs", "toep", "ar1", "rr")
SPEC_KEYS = ("formula", "correlation", "response", "fixed", "intercept", "levels", "factors",
             "random", "residual", "fix")
_LEAVES = {"scalar": ScalarMatrix, "diag": DiagonalMatrix, "us": UnconstrainedMatrix,
           "cs": CompoundSymmetricMatrix, "hcs": HeterogeneousCSMatrix,
           "toep": HeterogeneousToeplitzMatrix, "ar1": AR1Matrix}


@dataclass(frozen=True)
class RandomSpec:
    """A random term ``(terms | group)`` with the within-level covariance ``structure``;
    ``formula`` (a formula's term, e.g. ``"0 + factor(t)"``) replaces ``terms`` when given,
    ``rank`` is the number of columns of ``rr``'s loadings."""

    group: tuple[str, ...]
    terms: tuple[str, ...] = ("1",)
    structure: str = "scalar"
    formula: str | None = None
    rank: int | None = None


@dataclass
class Problem:
    """What :func:`covmodules.fit` needs: ``model``, ``y``, ``X``, ``x_names``; plus the rows
    of the data they were built from (``frame``, in model order) and whether its random terms
    are coded with the levels of all the data (``shares_levels``: a subset of crossed rows)."""

    model: MixedModel
    y: torch.Tensor
    X: torch.Tensor
    x_names: list[str]
    frame: pd.DataFrame
    shares_levels: bool = False


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
    formula: str | None = None

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, config: Mapping, prefix: str = "") -> "ModelSpec":
        """Validate a config dict (keys as in the module docstring) into a spec."""
        config = mapping(config, prefix.rstrip(".") or "spec")
        unknown = [k for k in config if k not in SPEC_KEYS]
        if unknown:
            fail(f"{prefix}{unknown[0]}: unexpected key; the spec keys are {list(SPEC_KEYS)}")
        if config.get("formula") is not None:
            config = _with_formula(config, prefix)
        elif config.get("correlation") is not None:
            fail(f"{prefix}correlation: goes with formula (or use residual)")
        if not isinstance(config.get("response"), str) or not config["response"]:
            fail(f"{prefix}response: the response column name is required")
        intercept = config.get("intercept", True)
        if not isinstance(intercept, bool):
            fail(f"{prefix}intercept: expected true or false, got {intercept!r}")
        levels = mapping(config.get("levels"), f"{prefix}levels")
        for col, order in levels.items():
            if not isinstance(order, (list, tuple)) or not order:
                fail(f"{prefix}levels.{col}: expected a non-empty list of levels, got {order!r}")
        fix = mapping(config.get("fix"), f"{prefix}fix")
        for name, value in fix.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f"{prefix}fix.{name}: expected a number, got {value!r}")
        random = {name: _random_spec(name, term, f"{prefix}random.{name}")
                  for name, term in mapping(config.get("random"), f"{prefix}random").items()}
        return cls(response=config["response"],
                   fixed=names(config.get("fixed", ()), f"{prefix}fixed"),
                   intercept=intercept, levels={k: list(v) for k, v in levels.items()},
                   factors=names(config.get("factors", ()), f"{prefix}factors"),
                   random=random,
                   residual=ResidualSpec.from_config(config.get("residual", "scalar"),
                                                     f"{prefix}residual"),
                   fix={k: float(v) for k, v in fix.items()}, prefix=prefix,
                   formula=config.get("fixed_formula"))

    # ------------------------------------------------------------------ building
    def prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        """Check the columns the spec names and return the rows in model order (a grid
        residual sorts them row-major); ``factors`` become string columns."""
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"data must be a pandas DataFrame, got {type(df).__name__}")
        if len(df) == 0:
            fail(f"{self.prefix}data: no rows")
        p = self.prefix
        self._column(df, self.response, f"{p}response")
        if not pd.api.types.is_numeric_dtype(df[self.response]):
            fail(f"{p}response: column {self.response!r} must be numeric, "
                 f"got dtype {df[self.response].dtype}")
        for col in (*self.factors, *self.levels):
            self._column(df, col, f"{p}factors" if col in self.factors else f"{p}levels")
        for term in self.fixed:
            _term(term, df.columns, f"{p}fixed")
        for name, r in self.random.items():
            for col in r.group:
                self._column(df, col, f"{p}random.{name}.group")
            for term in () if r.formula is not None else r.terms:
                if term != "1":
                    _term(term, df.columns, f"{p}random.{name}.terms")
        for key, cols in self.residual.index.items():
            for col in names(cols, f"{p}residual.{key}"):
                self._column(df, col, f"{p}residual.{key}")
        frame = self.coded(df)
        if self.residual.structure == "ar1xar1_nugget":
            frame = frame.sort_values([self.residual.get("row"), self.residual.get("col")],
                                      kind="stable")
        return frame

    def coded(self, df: pd.DataFrame) -> pd.DataFrame:
        """A copy of ``df`` with ``factors`` as strings and, for a formula, the columns named
        in ``levels`` as Categoricals in that order (formulaic reads levels from dtypes)."""
        frame = df.copy()
        for col in self.factors:
            frame[col] = frame[col].astype(str)
        if self.formula is not None:
            for col, order in self.levels.items():
                frame[col] = pd.Categorical(frame[col].astype(str), categories=order)
        return frame

    def design(self, frame: pd.DataFrame):
        """The fixed-effects design (:class:`covmodules.design.Design`) of ``frame``."""
        if self.formula is not None:
            try:
                d = FormulaDesign(self.formula, frame)
            except ValueError as err:
                fail(f"{self.prefix}formula: {err}")
            return Design(d.matrix, d.names, d.levels)
        terms = [_term(t, frame.columns, f"{self.prefix}fixed") for t in self.fixed]
        try:
            return fixed_design(frame, terms, intercept=self.intercept, levels=self.levels)
        except (ValueError, TypeError) as err:
            fail(f"{self.prefix}fixed: {err}")

    def response_vector(self, frame: pd.DataFrame) -> torch.Tensor:
        y = frame[self.response].to_numpy(dtype=np.float64)
        if not np.isfinite(y).all():
            fail(f"{self.prefix}response: column {self.response!r} has "
                 f"{int((~np.isfinite(y)).sum())} missing or infinite value(s)")
        return torch.tensor(y)

    def covariance(self, frame: pd.DataFrame, axis: TimeAxis | None = None,
                   whole: pd.DataFrame | None = None, shared_levels: bool = False
                   ) -> MixedModel:
        """The covariance model ``V = Σ Z G Zᵀ + R`` of the rows of ``frame``.

        ``axis`` (:meth:`time_axis` of the data ``frame``'s rows come from, restricted to
        them) gives the residual's time positions and size; by default those of ``frame``;
        ``whole`` (those data) codes the formula terms of random effects, and with
        ``shared_levels`` their grouping levels too (every subset then has all of them)."""
        random = {name: self._random_term(name, r, frame, whole, shared_levels)
                  for name, r in self.random.items()}
        residual = self.residual.module(frame, axis, f"{self.prefix}residual")
        model = MixedModel(random=random, residual=residual)
        for name, value in self.fix.items():
            if name not in model.param_names:
                fail(f"{self.prefix}fix.{name}: unknown parameter; the model's parameters "
                     f"are {model.param_names}")
            try:
                model.fix(name, value)
            except ValueError as err:
                fail(f"{self.prefix}fix.{name}: {err}")
        return model

    def problem(self, frame: pd.DataFrame, rows=None, design=None,
                axis: TimeAxis | None = None, shared_levels: bool = False) -> Problem:
        """The :class:`Problem` of ``frame`` (prepared), or of its positional ``rows``.

        ``design`` and ``axis`` (:meth:`design` and :meth:`time_axis` of all of ``frame``,
        built once when many subsets are taken) keep the columns of X and the residual's time
        positions the same across row subsets, so every batch of whole groups has the
        parameters, and the structure, of the whole data; ``shared_levels`` codes the random
        terms with all of ``frame``'s levels (subsets of rows of crossed terms)."""
        design = self.design(frame) if design is None else design
        X, whole = design.matrix, None
        if rows is not None:
            whole = frame
            axis = self.time_axis(frame) if axis is None else axis
            rows = np.asarray(rows)
            index = torch.as_tensor(rows, dtype=torch.long)
            frame, X = frame.iloc[rows], X[index]
            axis = None if axis is None else axis.take(index)
        return Problem(self.covariance(frame, axis, whole, shared_levels),
                       self.response_vector(frame), X, list(design.names), frame,
                       shared_levels)

    def build(self, df: pd.DataFrame) -> Problem:
        """Prepare ``df`` and build its :class:`Problem`."""
        return self.problem(self.prepare(df))

    def groups(self, frame: pd.DataFrame, group=None) -> tuple[torch.Tensor, list[str]]:
        """Codes and labels of independent blocks of rows (``V`` is block diagonal over them).

        ``group`` names the grouping columns; by default the coarsest grouping among the random
        terms and the residual subject that nests all the others. Rows form one block when the
        residual couples all rows (a grid, a series without subject) or groupings cross.
        """
        coupled = self.residual.couples_subjects
        candidates = [r.group for r in self.random.values()]
        if self.residual.get("subject") is not None:
            candidates.append(names(self.residual.get("subject"), "subject"))
        n = len(frame)
        if group is not None:
            group = names(group, f"{self.prefix}group")
            for col in group:
                self._column(frame, col, f"{self.prefix}group")
            codes, labels = grouping(frame, list(group))
            if len(labels) > 1 and coupled:
                fail(f"{self.prefix}group: the residual structure "
                     f"{self.residual.structure!r} couples rows across groups {group}")
            for other in candidates:
                if not _nested(frame, other, codes):
                    fail(f"{self.prefix}group: grouping {list(other)} is not nested in "
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
            fail(f"{key}: unknown column {col!r}; the data has columns {list(df.columns)}")

    def term_specs(self, name: str, frame: pd.DataFrame, fitted: pd.DataFrame | None = None):
        """The column specs of random term ``name`` for :func:`random_design` on ``frame``
        (a formula's term coded as in the ``fitted`` data, by default ``frame``)."""
        r, key = self.random[name], f"{self.prefix}random.{name}"
        if r.formula is None:
            return [t if t == "1" else _term(t, frame.columns, f"{key}.terms") for t in r.terms]
        try:
            d = FormulaDesign(r.formula, frame if fitted is None else fitted)
            values = d.matrix if fitted is None else d.evaluate(frame)
        except ValueError as err:
            fail(f"{key}: {err}")
        if not d.names:
            fail(f"{key}: the term {r.formula!r} has no columns")
        return [(nm, lambda df, j=j: values[:, j].numpy()) for j, nm in enumerate(d.names)]

    def _random_term(self, name, r: RandomSpec, frame, whole=None, shared_levels=False):
        terms = self.term_specs(name, frame, whole)
        group = list(r.group)
        by = group if len(group) > 1 else group[0]
        order = self.levels.get(group[0]) if len(group) == 1 else None
        try:
            if shared_levels and whole is not None:
                order = grouping(whole, by, order)[1]
            rd = random_design(frame, by, terms, levels=order)
        except (ValueError, TypeError) as err:
            fail(f"{self.prefix}random.{name}: {err}")
        k, levels = rd.num_terms, IdentityMatrix(rd.num_levels)
        if k == 1:
            return rd, ScalarMatrix(rd.num_levels)
        leaf = (Gram(loadings=LowerTriangularMatrix(k, min(r.rank, k), order="col"),
                     gram_type="xxt") if r.structure == "rr" else _LEAVES[r.structure](k))
        return rd, KroneckerProduct(levels=levels, terms=leaf)

    def time_axis(self, frame: pd.DataFrame) -> TimeAxis | None:
        """The residual's :meth:`~covmodules.residuals.ResidualSpec.time_axis` of ``frame``."""
        return self.residual.time_axis(frame, f"{self.prefix}residual")


def _random_spec(name: str, term, key: str) -> RandomSpec:
    if "/" in name or "." in name or name == "residual":
        fail(f"{key}: a random term name must not contain '/' or '.' nor be 'residual'")
    term = mapping(term, key)
    allowed = ("group", "terms", "structure", "formula", "rank")
    unknown = [k for k in term if k not in allowed]
    if unknown:
        fail(f"{key}.{unknown[0]}: unexpected key; a random term takes {', '.join(allowed)}")
    if "group" not in term:
        fail(f"{key}.group: the grouping column(s) are required")
    formula = term.get("formula")
    if formula is not None and (not isinstance(formula, str) or "terms" in term):
        fail(f"{key}.formula: expected the terms as a formula string (e.g. '1 + Days'), "
             "not together with terms")
    terms = term.get("terms", ["1"])
    terms = (terms,) if isinstance(terms, str) else tuple(str(t) for t in terms)
    if not terms:
        fail(f"{key}.terms: at least one term is required")
    several = len(terms) > 1 or (formula is not None and formula.strip() not in ("1", "0 + 1"))
    structure = term.get("structure", "us" if several else "scalar")
    if structure not in RANDOM_STRUCTURES:
        fail(f"{key}.structure: unknown structure {structure!r} for a random term; "
             f"choose one of {list(RANDOM_STRUCTURES)}")
    rank = term.get("rank", 2 if structure == "rr" else None)
    if rank is not None and (structure != "rr" or isinstance(rank, bool)
                             or not isinstance(rank, int) or rank < 1):
        fail(f"{key}.rank: a positive integer, for structure rr only; got {rank!r}")
    return RandomSpec(names(term["group"], f"{key}.group"), terms, structure, formula, rank)


def _with_formula(config: dict, prefix: str) -> dict:
    """``config`` with its ``formula`` (and ``correlation``) compiled into the spec's keys;
    a ``random`` entry of the config changes only the keys it names of the formula's term."""
    for key in ("response", "fixed"):
        if config.get(key):
            fail(f"{prefix}{key}: give the model as formula or as response and fixed, not both")
    if config.get("correlation") is not None and config.get("residual") is not None:
        fail(f"{prefix}correlation: give correlation or residual, not both")
    compiled = compile_formula(config["formula"], config.get("correlation"), prefix)
    random = compiled["random"]
    for name, term in mapping(config.get("random"), f"{prefix}random").items():
        term = mapping(term, f"{prefix}random.{name}")
        if "terms" in term:
            random.get(name, {}).pop("formula", None)
        random[name] = {**random.get(name, {}), **term}
    return {**config, "response": compiled["response"], "fixed_formula": compiled["formula"],
            "random": random,
            "residual": compiled.get("residual", config.get("residual") or "scalar")}


def _nested(frame, columns, codes) -> bool:
    """Whether every level of the grouping ``columns`` lies within one block of ``codes``."""
    inner = grouping(frame, list(columns))[0]
    pairs = torch.unique(torch.stack([inner, codes]), dim=1)
    return pairs.shape[1] == int(inner.max()) + 1


def _term(text: str, columns, key: str):
    """:func:`~covmodules.expressions.parse_term`, its error a :class:`SpecError` naming ``key``."""
    try:
        return parse_term(text, columns)
    except ValueError as err:
        fail(f"{key}: {err}")
