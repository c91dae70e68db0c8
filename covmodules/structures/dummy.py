r"""torch-openreml's dummy (indicator) matrix of one or more categorical columns.

.. math:: X_{ij} = [\text{row } i \text{ is at combination } j], \qquad
          j \in \text{levels}_1 \times \dots \times \text{levels}_k,

one column per combination of the columns' levels: the full cross by default (unobserved
combinations give all-zero columns), where :class:`~covmodules.DesignMatrix` keeps only the
observed ones. A row whose combination is not among the columns warns and stays all zero.
"""

import warnings
from itertools import product

import torch

from .design_matrix import _values
from .fixed import FixedMatrix

SEP = "⋈"


class DummyMatrix(FixedMatrix):
    r"""Indicator matrix of ``*columns`` (lists, tuples, pandas Series, arrays) with column
    names ``colnames`` (``"a⋈x"`` for an interaction).

    ``levels``: one level list per column (default: each column's sorted values); the columns
    are their product, sorted when ``lex_order``. ``drop_first`` drops the first column,
    ``drop_empty_cols`` the all-zero ones. No parameters.

    Example::

        >>> from covmodules import DummyMatrix
        >>> X = DummyMatrix(["a", "b", "a"], ["x", "x", "y"])
        >>> X.colnames
        ['a⋈x', 'a⋈y', 'b⋈x', 'b⋈y']
        >>> X()
        tensor([[1., 0., 0., 0.],
                [0., 0., 1., 0.],
                [0., 1., 0., 0.]], dtype=torch.float64)
    """

    def __init__(self, *columns, levels=None, lex_order: bool = True, drop_first: bool = False,
                 drop_empty_cols: bool = False):
        if not columns:
            raise ValueError("DummyMatrix needs at least one column")
        values = [_values(c, f"column {i}") for i, c in enumerate(columns)]
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"columns must have equal lengths, got {[len(v) for v in values]}")
        if levels is None:
            levels = [sorted(set(v)) for v in values]
        elif not isinstance(levels, (list, tuple)) or len(levels) != len(columns):
            raise ValueError(f"levels must be a list of {len(columns)} per-column level lists")
        combos = list(product(*levels))
        if lex_order:
            combos = sorted(combos)
        index = {c: j for j, c in enumerate(combos)}
        X = torch.zeros(len(values[0]), len(combos), dtype=torch.float64)
        for i, row in enumerate(zip(*values)):
            if row in index:
                X[i, index[row]] = 1.0
            else:
                warnings.warn(f"DummyMatrix: unknown combination {row} at row {i} dropped "
                              "(an all-zero row)", RuntimeWarning, stacklevel=2)
        keep = list(range(1 if drop_first else 0, len(combos)))
        if drop_empty_cols:
            keep = [j for j in keep if bool(X[:, j].any())]
        if not keep:
            raise ValueError("DummyMatrix has no columns left")
        super().__init__(X[:, keep], name="DummyMatrix")
        self.colnames = [SEP.join(map(str, combos[j])) for j in keep]
