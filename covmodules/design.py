"""Fixed- and random-effect design matrices from a pandas DataFrame.

This is the part of R's ``model.matrix`` / lme4's ``lFormula`` that the REML engine needs, with
the formula already split into column specs:

- :func:`fixed_design` builds X: intercept, numeric columns, categorical columns with treatment
  contrasts, interactions ``"a:b"`` and transformed columns ``(name, function)``; columns are
  named as R names them (``"(Intercept)"``, ``"SexFemale"``, ``"SexFemale:age"``).
- :func:`random_design` builds the Z of a random term ``(terms | group)``, one block of columns
  per group level (subject-major, as lme4 orders Z).
- :func:`grouping` and :func:`positions_within_group` give group codes and the position of each
  row within its group, for grouped residual structures (nlme ``corAR1(form = ~ 1 | g)``).
- :func:`drop_aliased` removes columns of X aliased with earlier ones, as lme4 does, deciding
  on ``XᵀX`` (:func:`independent_columns`, which sharded fits apply to summed Gram matrices).

Level order of a categorical column: ``levels[column]`` when given (matched on the labels
``str(value)``, ``"TRUE"``/``"FALSE"`` for booleans), else the order of the categories of a
pandas Categorical, else the sorted unique values; levels that do not occur in the data are
not used. The first level is the reference level.

>>> import pandas as pd
>>> df = pd.DataFrame({"y": [1.0, 2.0, 4.0, 3.0], "age": [8, 10, 8, 10],
...                    "Sex": ["Male", "Male", "Female", "Female"]})
>>> d = fixed_design(df, ["age", "Sex"], levels={"Sex": ["Male", "Female"]})
>>> d.names
['(Intercept)', 'age', 'SexFemale']
>>> d.matrix
tensor([[ 1.,  8.,  0.],
        [ 1., 10.,  0.],
        [ 1.,  8.,  1.],
        [ 1., 10.,  1.]], dtype=torch.float64)
>>> r = random_design(df, "Sex", ["1", "age"])
>>> r.levels, r.terms, tuple(r.Z.shape)
(['Female', 'Male'], ['(Intercept)', 'age'], (4, 4))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import pandas as pd
import torch

from .operators.grouped import default_positions

__all__ = ["Design", "RandomDesign", "fixed_design", "random_design", "grouping",
           "positions_within_group", "drop_aliased", "independent_columns"]

Spec = Union[str, tuple[str, Callable[[pd.DataFrame], object]]]
Levels = Mapping[str, Sequence]


@dataclass(frozen=True)
class Design:
    """A fixed-effects design: ``matrix`` (n × p), column ``names`` and the level order of each
    categorical column used."""

    matrix: torch.Tensor
    names: list[str]
    levels: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RandomDesign:
    """The design of a random term ``(terms | group)``.

    ``term_matrix`` (n × num_terms) holds the term values per row; Z (n × num_levels·num_terms)
    places row i's terms in the block of its group level: column ``level * num_terms + term``.
    """

    group: tuple[str, ...]
    levels: list[str]
    terms: list[str]
    group_codes: torch.Tensor
    term_matrix: torch.Tensor

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def num_terms(self) -> int:
        return len(self.terms)

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = self.term_matrix.shape
        rows = torch.arange(n).repeat_interleave(k)
        cols = (self.group_codes[:, None] * k + torch.arange(k)).reshape(-1)
        return rows, cols

    @functools.cached_property
    def Z(self) -> torch.Tensor:
        """Dense Z (n × q)."""
        n, k = self.term_matrix.shape
        Z = self.term_matrix.new_zeros(n, self.num_levels * k)
        rows, cols = self._indices()
        Z[rows, cols] = self.term_matrix.reshape(-1)
        return Z

    @functools.cached_property
    def Z_sparse(self) -> torch.Tensor:
        """Z as a coalesced sparse COO tensor (at most num_terms entries per row)."""
        n, k = self.term_matrix.shape
        rows, cols = self._indices()
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), self.term_matrix.reshape(-1),
                                       (n, self.num_levels * k), is_coalesced=True,
                                       check_invariants=False)


def _label(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    return str(value)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    if not isinstance(name, str):
        raise TypeError(f"a column spec must be a str or a (name, function) pair, got {name!r}")
    if name not in df.columns:
        raise ValueError(f"unknown column {name!r}; available columns: {list(df.columns)}")
    series = df[name]
    missing = int(series.isna().sum())
    if missing:
        raise ValueError(f"column {name!r} has {missing} missing value(s) (NaN)")
    return series


def _is_categorical(series: pd.Series) -> bool:
    dtype = series.dtype
    return (isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(dtype)
            or pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype))


def _numeric(values, name: str, n: int) -> np.ndarray:
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values).ravel())
    if len(series) != n:
        raise ValueError(f"column {name!r} has {len(series)} values, expected {n}")
    if _is_categorical(series) or not pd.api.types.is_numeric_dtype(series.dtype):
        raise TypeError(f"column {name!r} must be numeric, got dtype {series.dtype}")
    out = series.to_numpy(dtype=np.float64)
    bad = int((~np.isfinite(out)).sum())
    if bad:
        raise ValueError(f"column {name!r} has {bad} missing or infinite value(s)")
    return out


def _factor(df: pd.DataFrame, name: str, levels: Levels | None) -> tuple[np.ndarray, list[str]]:
    """Level codes (0-based, per row) and level labels of a categorical column."""
    series = _column(df, name)
    codes, uniques = pd.factorize(series, sort=False)
    labels = [_label(u) for u in uniques]
    present = set(labels)
    if len(present) != len(labels):
        raise ValueError(f"column {name!r} has distinct values with the same label")
    if levels is not None and name in levels:
        order = [_label(v) for v in levels[name]]
        if len(set(order)) != len(order):
            raise ValueError(f"levels[{name!r}] has duplicate levels")
        missing = sorted(present - set(order))
        if missing:
            raise ValueError(f"column {name!r} has values not in levels[{name!r}]: {missing}")
        unknown = [lv for lv in order if lv not in present]
        if unknown:
            raise ValueError(f"unknown level(s) {unknown} in levels[{name!r}]: "
                             f"not found in column {name!r}")
    elif isinstance(series.dtype, pd.CategoricalDtype):
        order = [_label(c) for c in series.cat.categories if _label(c) in present]
    else:
        try:
            order = [_label(u) for u in sorted(uniques)]
        except TypeError:
            order = sorted(labels)
    position = {lv: i for i, lv in enumerate(order)}
    remap = np.array([position[lv] for lv in labels], dtype=np.int64)
    return remap[codes], order


def grouping(df: pd.DataFrame, columns: str | Sequence[str],
             levels: Levels | Sequence | None = None) -> tuple[torch.Tensor, list[str]]:
    """Group codes (LongTensor, per row) and level labels of the grouping by ``columns``.

    Several columns group by their interaction, as R's ``a:b``: labels ``"la:lb"``, only the
    combinations that occur, ordered with the first column varying slowest. ``levels`` is a
    dict of level orders per column, or a list giving the order of the group labels.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"a": ["x", "y", "x", "y"], "b": [2, 1, 1, 1]})
    >>> grouping(df, ["a", "b"])
    (tensor([1, 2, 0, 2]), ['x:1', 'x:2', 'y:1'])
    """
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise ValueError("grouping needs at least one column")
    group_order = None if levels is None or isinstance(levels, Mapping) else levels
    factors = [_factor(df, c, None if group_order is not None else levels) for c in columns]
    if len(factors) == 1:
        codes, labels = factors[0]
    else:
        keys = np.stack([f[0] for f in factors], axis=1)
        combos, codes = np.unique(keys, axis=0, return_inverse=True)
        codes = codes.ravel()
        labels = [":".join(f[1][i] for f, i in zip(factors, combo)) for combo in combos]
    if group_order is not None:
        frame = pd.DataFrame({"group": [labels[c] for c in codes]})
        codes, labels = _factor(frame, "group", {"group": group_order})
    return torch.as_tensor(codes, dtype=torch.long), labels


def positions_within_group(codes) -> torch.Tensor:
    """0, 1, 2, ... in data-row order within each group (nlme ``form = ~ 1 | g``): the checked
    tensor form of :func:`covmodules.operators.grouped.default_positions`, ``Grouped``'s default.

    >>> positions_within_group(torch.tensor([1, 0, 1, 1, 0]))
    tensor([0, 0, 1, 2, 1])
    """
    codes = torch.as_tensor(codes)
    if codes.dim() != 1 or codes.is_floating_point() or codes.is_complex():
        raise ValueError("codes must be a 1-D integer tensor")
    codes = codes.long()
    if codes.numel() == 0:
        return codes
    if int(codes.min()) < 0:
        raise ValueError("codes must be non-negative")
    return torch.from_numpy(default_positions(codes.cpu().numpy())).to(codes.device)


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype, got {dtype}")


def _spec_name(spec: Spec) -> str:
    if isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[0], str) or not callable(spec[1]):
            raise TypeError(f"a transformed column must be a (name, function) pair, got {spec!r}")
        return spec[0]
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"a column spec must be a str or a (name, function) pair, got {spec!r}")
    return spec


def _as_specs(terms) -> list:
    single = isinstance(terms, str) or (isinstance(terms, tuple) and len(terms) == 2
                                        and callable(terms[1]))
    return [terms] if single else list(terms)


def _term_values(df: pd.DataFrame, spec: Spec) -> np.ndarray:
    if isinstance(spec, tuple):
        return _numeric(spec[1](df), spec[0], len(df))
    return _numeric(_column(df, spec), spec, len(df))


def fixed_design(df: pd.DataFrame, terms: Sequence[Spec], intercept: bool = True,
                 levels: Levels | None = None, dtype: torch.dtype = torch.float64) -> Design:
    """X from the column specs ``terms``, in their order (after the intercept).

    A spec is a column name (numeric, or categorical: object / string / category / bool dtype
    or named in ``levels``), an interaction ``"a:b"`` of column names, or a pair ``(name,
    function of df)`` giving a numeric column. Categorical parts are coded as R codes them:
    treatment contrasts (first level dropped) when the term without that part is the intercept
    or is contained in an earlier term, else one indicator per level; without an intercept the
    first categorical part of the first term that has one gets indicators. R sorts terms by
    degree, so list main effects before interactions to get R's column order.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"age": [8.0, 10.0, 8.0], "Sex": ["M", "M", "F"]})
    >>> fixed_design(df, ["Sex:age"], levels={"Sex": ["M", "F"]}).names
    ['(Intercept)', 'SexM:age', 'SexF:age']
    >>> fixed_design(df, ["age", "Sex", "Sex:age"], levels={"Sex": ["M", "F"]}).names
    ['(Intercept)', 'age', 'SexF', 'SexF:age']
    >>> fixed_design(df, [("log(age)", lambda d: np.log(d.age))], intercept=False).names
    ['log(age)']
    """
    _check_dtype(dtype)
    terms = _as_specs(terms)
    n = len(df)
    if n == 0:
        raise ValueError("the DataFrame has no rows")
    factors: dict[str, tuple[np.ndarray, list[str]]] = {}

    def is_factor(name: str) -> bool:
        if levels is not None and name in levels:
            return True
        return _is_categorical(_column(df, name))

    parsed = []
    for spec in terms:
        name = _spec_name(spec)
        parts = [name] if isinstance(spec, tuple) else name.split(":")
        if any(not p for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"malformed term {name!r}")
        kinds = ["numeric" if isinstance(spec, tuple) or not is_factor(p) else "factor"
                 for p in parts]
        parsed.append((spec, parts, kinds))
    sets = [frozenset(parts) for _, parts, _ in parsed]
    if len(set(sets)) != len(sets):
        raise ValueError(f"duplicate terms in {[_spec_name(s) for s in terms]}")

    names = ["(Intercept)"] if intercept else []
    columns = [np.ones(n)] if intercept else []
    indicators_pending = not intercept
    for t, (spec, parts, kinds) in enumerate(parsed):
        term_cols = [("", np.ones(n))]
        for part, kind in zip(parts, kinds):
            if kind == "numeric":
                part_cols = [(part, _term_values(df, spec if isinstance(spec, tuple) else part))]
            else:
                if part not in factors:
                    factors[part] = _factor(df, part, levels)
                codes, order = factors[part]
                rest = sets[t] - {part}
                contrasts = not rest or any(rest <= s for s in sets[:t])
                if indicators_pending:
                    contrasts, indicators_pending = False, False
                start = 1 if contrasts else 0
                part_cols = [(part + order[i], (codes == i).astype(np.float64))
                             for i in range(start, len(order))]
            term_cols = [(f"{a}:{b}" if a else b, ca * cb)
                         for b, cb in part_cols for a, ca in term_cols]
        names += [nm for nm, _ in term_cols]
        columns += [c for _, c in term_cols]
    matrix = torch.as_tensor(np.stack(columns, axis=1) if columns else np.zeros((n, 0)),
                             dtype=dtype)
    return Design(matrix, names, {k: v[1] for k, v in factors.items()})


def random_design(df: pd.DataFrame, group: str | Sequence[str], terms: Sequence[Spec] = ("1",),
                  levels: Levels | Sequence | None = None,
                  dtype: torch.dtype = torch.float64) -> RandomDesign:
    """The random term ``(terms | group)``: ``"1"`` is the intercept, other terms are numeric
    column names or ``(name, function of df)`` pairs; ``group`` and ``levels`` as in
    :func:`grouping`. Z's columns run over the terms of level 1, then level 2, ...

    >>> import pandas as pd
    >>> df = pd.DataFrame({"g": ["b", "a", "b"], "t": [0.0, 1.0, 2.0]})
    >>> random_design(df, "g", ["1", "t"]).Z
    tensor([[0., 0., 1., 0.],
            [1., 1., 0., 0.],
            [0., 0., 1., 2.]], dtype=torch.float64)
    """
    _check_dtype(dtype)
    terms = _as_specs(terms)
    if len(terms) == 0:
        raise ValueError("a random term needs at least one term")
    names = ["(Intercept)" if s == "1" else _spec_name(s) for s in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate random-effect terms {names}")
    n = len(df)
    if n == 0:
        raise ValueError("the DataFrame has no rows")
    if isinstance(levels, Mapping):
        for spec in terms:
            if isinstance(spec, str) and spec in levels:
                raise TypeError(f"random-effect term {spec!r} must be numeric, "
                                f"but it is categorical (named in levels)")
    values = [np.ones(n) if s == "1" else _term_values(df, s) for s in terms]
    codes, labels = grouping(df, group, levels)
    group = (group,) if isinstance(group, str) else tuple(group)
    return RandomDesign(group, labels, names, codes,
                        torch.as_tensor(np.stack(values, axis=1), dtype=dtype))


def independent_columns(gram: torch.Tensor, tol: float = 1e-7) -> list[int]:
    """The columns of X that lme4's rank check keeps, decided on the Gram matrix ``XᵀX``.

    Columns are taken in order; column ``j`` is kept when its residual after projection onto
    the kept earlier columns has norm above ``tol`` times its own (in a Cholesky of the kept
    columns' Gram matrix: ``pivot² > tol² (XᵀX)_jj``); a zero column is dropped. Summing
    ``X_sᵀX_s`` over the shards of a data set gives the decision of the whole data set.
    ``XᵀX`` resolves a residual down to about ``√eps`` of a column's norm, so ``tol`` must
    be at least 6e-8.

    >>> X = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    >>> independent_columns(X.T @ X)
    [0, 1]
    """
    if not (isinstance(gram, torch.Tensor) and gram.dim() == 2
            and gram.shape[0] == gram.shape[1]):
        raise ValueError("gram must be a square 2-D tensor (XᵀX)")
    if not 16 * torch.finfo(torch.float64).eps <= tol * tol < 1:
        raise ValueError(f"tol must lie in [6e-08, 1): XᵀX resolves a column's residual only "
                         f"to about 1.5e-08 of its norm; got {tol}")
    G = gram.detach().to(device="cpu", dtype=torch.float64)
    L = G.new_zeros(G.shape)            # Cholesky factor of the kept columns' Gram matrix
    kept: list[int] = []
    for j in range(G.shape[0]):
        k = len(kept)
        c = torch.linalg.solve_triangular(L[:k, :k], G[kept, j][:, None], upper=False)[:, 0]
        diagonal = float(G[j, j])
        pivot2 = diagonal - float(c @ c)
        if diagonal > 0 and pivot2 > tol * tol * diagonal:
            L[k, :k], L[k, k] = c, pivot2 ** 0.5
            kept.append(j)
    return kept


def drop_aliased(X: torch.Tensor, names: Sequence[str], tol: float = 1e-7
                 ) -> tuple[torch.Tensor, list[str], list[str]]:
    """Drop the columns of X aliased with earlier ones (lme4's rank check, tolerance 1e-7).

    The decision is :func:`independent_columns` of ``XᵀX``: a column is dropped when the norm
    of its residual after projection onto the kept earlier columns is at most ``tol`` times
    its own norm (a zero column is always dropped), as R's pivoting QR (``qr(X, tol)``,
    LINPACK) decides. Returns the kept columns, their names and the dropped names.

    >>> X = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    >>> drop_aliased(X, ["(Intercept)", "b", "c"])[1:]
    (['(Intercept)', 'b'], ['c'])
    """
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError("X must be a 2-D tensor")
    names = list(names)
    if len(names) != X.shape[1]:
        raise ValueError(f"{len(names)} names for {X.shape[1]} columns")
    A = X.detach().to(torch.float64)
    kept = independent_columns(A.T @ A, tol)
    dropped = [name for j, name in enumerate(names) if j not in kept]
    return X[:, kept], [names[j] for j in kept], dropped
