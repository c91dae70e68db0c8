r"""Incidence (design) matrix of one categorical factor or of an interaction of several.

.. math:: Z_{ij} = [\text{observation } i \text{ is at level } j], \qquad
          \mathbf{Z} \in \{0, 1\}^{n \times q},

one ``1`` per row. Only the integer level code of each observation is stored; the dense
one-hot matrix is built on evaluation, in the requested dtype. It has no parameters.
"""

import math

import numpy as np
import torch

from ..base import Structure


def _values(factor, name: str) -> list:
    """The factor's values as a Python list, rejecting missing values."""
    if isinstance(factor, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of values, got a single string")
    if isinstance(factor, torch.Tensor):
        if factor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(factor.shape)}")
        values = factor.tolist()
    elif isinstance(factor, np.ndarray):
        if factor.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {factor.shape}")
        values = factor.tolist()
    elif hasattr(factor, "tolist"):
        values = list(factor.tolist())
    elif isinstance(factor, (list, tuple)):
        values = list(factor)
    else:
        raise TypeError(f"{name} must be a list, array, pandas Series or tensor, "
                        f"got {type(factor).__name__}")
    if not values:
        raise ValueError(f"{name} is empty")
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or _is_pandas_missing(v):
            raise ValueError(f"{name} has a missing value (None or NaN) at position {i}")
        if not isinstance(v, (str, int, float, bool, tuple)):
            raise TypeError(f"{name} values must be strings or numbers, got "
                            f"{type(v).__name__} at position {i}")
    return values


def _is_pandas_missing(v) -> bool:
    return type(v).__name__ in ("NAType", "NaTType")


def _default_levels(factor, values: list, name: str) -> list:
    """Observed values in the categorical order (pandas categorical) or sorted."""
    observed = set(values)
    categories = getattr(getattr(factor, "cat", factor), "categories", None)
    if categories is not None:
        return [c for c in categories.tolist() if c in observed]
    try:
        return sorted(observed)
    except TypeError:
        raise TypeError(f"{name} mixes value types that cannot be sorted; give levels= to "
                        "set the level order") from None


def _codes(values: list, levels, name: str) -> tuple[list, list[int]]:
    """Validated level list and each value's position in it."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels for {name} must be a list, got {type(levels).__name__}")
    levels = list(levels)
    index = {level: j for j, level in enumerate(levels)}
    if len(index) != len(levels):
        raise ValueError(f"levels for {name} contain duplicates: {levels}")
    unknown = sorted({repr(v) for v in values if v not in index})
    if unknown:
        raise ValueError(f"{name} has values not in its levels: {', '.join(unknown)}")
    return levels, [index[v] for v in values]


class DesignMatrix(Structure):
    r"""The ``n x q`` 0/1 incidence matrix of a factor (or of an interaction of factors).

    Each factor is a list, numpy array, pandas Series or 1-D tensor of strings or integers.
    For one factor the columns are its levels: ``levels`` (a list) gives their order and may
    include unobserved levels; by default the sorted unique values (a pandas categorical keeps
    its category order). For several factors the columns are the observed combinations,
    ordered lexicographically by the factors' level orders; ``levels`` is then a list of
    per-factor lists (``None`` for the default). Attributes: ``levels`` (labels; tuples for
    interactions), ``codes`` (long buffer, the column of each row), ``n`` and ``q``.

    Example::

        >>> from covmodules import DesignMatrix
        >>> Z = DesignMatrix(["b", "a", "b"], levels=["b", "a"])
        >>> Z.levels, Z.shape
        (['b', 'a'], (3, 2))
        >>> Z()
        tensor([[1., 0.],
                [0., 1.],
                [1., 0.]], dtype=torch.float64)
        >>> DesignMatrix(["x", "y", "x"], [2, 1, 1]).levels
        [('x', 1), ('x', 2), ('y', 1)]
    """

    def __init__(self, *factors, levels=None):
        super().__init__()
        if not factors:
            raise ValueError("DesignMatrix needs at least one factor")
        names = ["factor"] if len(factors) == 1 else [f"factor {i}" for i in range(len(factors))]
        values = [_values(f, name) for f, name in zip(factors, names)]
        lengths = [len(v) for v in values]
        if len(set(lengths)) != 1:
            raise ValueError(f"factors must have equal lengths, got {lengths}")
        if len(factors) == 1:
            per_factor = [levels]
        elif levels is None:
            per_factor = [None] * len(factors)
        elif not isinstance(levels, (list, tuple)) or len(levels) != len(factors):
            raise ValueError(f"levels must be a list of {len(factors)} per-factor level lists")
        else:
            per_factor = list(levels)
        level_lists, codes = [], []
        for factor, v, given, name in zip(factors, values, per_factor, names):
            order = _default_levels(factor, v, name) if given is None else given
            lv, c = _codes(v, order, name)
            level_lists.append(lv)
            codes.append(c)
        if len(factors) == 1:
            self.levels, column = level_lists[0], codes[0]
        else:
            combos = list(zip(*codes))
            observed = sorted(set(combos))
            index = {combo: j for j, combo in enumerate(observed)}
            self.levels = [tuple(lv[c] for lv, c in zip(level_lists, combo)) for combo in observed]
            column = [index[combo] for combo in combos]
        self.n, self.q = lengths[0], len(self.levels)
        self.register_buffer("codes", torch.tensor(column, dtype=torch.long))

    @property
    def shape(self):
        return (self.n, self.q)

    def _evaluate(self, nat):
        Z = torch.zeros(self.n, self.q, dtype=nat.dtype, device=nat.device)
        return Z.scatter_(1, self.codes.to(nat.device)[:, None], 1.0)

    def _jacobian(self, nat):
        return nat.new_zeros(0, self.n, self.q)

    def _dv_matmul(self, nat, W, transpose=False):
        return W.new_zeros(0, self.q if transpose else self.n, W.shape[1])

    def extra_repr(self):
        return f"n={self.n}, q={self.q}"
