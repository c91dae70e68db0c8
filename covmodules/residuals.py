"""The residual of a model spec: its config, each row's place on the time axis, its module.

:class:`ResidualSpec` is the ``residual`` key of a spec (the structures and their index
columns are tabled in :mod:`covmodules.specs`); :meth:`ResidualSpec.time_axis` gives each row's
subject and position within the subject (:class:`TimeAxis`), and :meth:`ResidualSpec.module`
the covariance module of the residuals: ``sigma^2 I``, ``I``, a ``Grouped`` structure within
each subject, or the spatial grid's ``sigma^2_f AR1(row) ⊗ AR1(col) + sigma^2_n I``.

>>> import pandas as pd
>>> spec = ResidualSpec.from_config({"structure": "ar1", "subject": "g"}, "residual")
>>> frame = pd.DataFrame({"g": ["a", "a", "b", "a"]})
>>> axis = spec.time_axis(frame, "residual")
>>> axis.positions.tolist(), axis.size
([0, 1, 0, 2], 3)
>>> spec.module(frame, axis, "residual").free_param_names
['within/sigma^2', 'within/rho']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import fail, mapping, names
from .design import grouping, positions_within_group
from .operators import Grouped, KroneckerProduct, Sum
from .structures import (AR1Matrix, CAR1Matrix, CompoundSymmetricMatrix, DiagonalMatrix,
                         IdentityMatrix, ScalarMatrix, UnconstrainedMatrix)

__all__ = ["ResidualSpec", "TimeAxis", "RESIDUAL_STRUCTURES"]

RESIDUAL_STRUCTURES = {"scalar": (), "identity": (), "ar1": ("subject", "time"),
                       "cs": ("subject", "time"), "us": ("subject", "time"),
                       "diag": ("subject", "time"), "car1": ("subject", "time"),
                       "ar1xar1_nugget": ("row", "col")}
REQUIRED_INDEX = {"car1": ("time",), "ar1xar1_nugget": ("row", "col")}
_WITHIN = {"ar1": AR1Matrix, "cs": CompoundSymmetricMatrix, "us": UnconstrainedMatrix,
           "diag": DiagonalMatrix}


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


@dataclass(frozen=True)
class ResidualSpec:
    """The residual structure and its index columns (``subject``, ``time``, ``row``, ``col``)."""

    structure: str = "scalar"
    index: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str):
        return self.index.get(key)

    @classmethod
    def from_config(cls, value, key: str) -> "ResidualSpec":
        """A structure name or ``{structure: <name>, <index columns>}``, checked (``key``:
        where it stands in the config, for the messages)."""
        config = {"structure": value} if isinstance(value, str) else mapping(value, key)
        if "structure" not in config:
            fail(f"{key}.structure: the residual structure is required")
        structure = config.pop("structure")
        if structure not in RESIDUAL_STRUCTURES:
            fail(f"{key}.structure: unknown structure {structure!r}; "
                 f"choose one of {list(RESIDUAL_STRUCTURES)}")
        allowed = RESIDUAL_STRUCTURES[structure]
        for k, v in config.items():
            if k not in allowed:
                extra = f" (it takes {', '.join(allowed)})" if allowed else " (it takes none)"
                fail(f"{key}.{k}: unexpected key for structure {structure!r}{extra}")
            if k != "subject" and not isinstance(v, str):
                fail(f"{key}.{k}: expected a column name, got {v!r}")
            if k == "subject":
                names(v, f"{key}.{k}")
        for k in REQUIRED_INDEX.get(structure, ()):
            if k not in config:
                fail(f"{key}.{k}: structure {structure!r} needs the {k} column")
        return cls(structure, config)

    @property
    def couples_subjects(self) -> bool:
        """Whether the residual couples rows of different subjects: the grid, or a
        within-subject structure without a subject column."""
        return self.structure == "ar1xar1_nugget" or (
            self.structure not in ("scalar", "identity") and self.get("subject") is None)

    def time_axis(self, frame: pd.DataFrame, key: str) -> TimeAxis | None:
        """Each row's subject and position on the within-subject time axis, and the axis
        size (``None`` for residuals without one): levels of ``time`` (its values for
        ``car1``), else the row order within the subject."""
        s, n = self.structure, len(frame)
        if s in ("scalar", "identity", "ar1xar1_nugget"):
            return None
        subject, time = self.get("subject"), self.get("time")
        codes = (grouping(frame, list(names(subject, key)))[0] if subject is not None
                 else torch.zeros(n, dtype=torch.long))
        if time is None:
            positions, times = positions_within_group(codes), None
        else:
            values = frame[time].to_numpy()
            if s == "car1" and not pd.api.types.is_numeric_dtype(frame[time]):
                fail(f"{key}.time: column {time!r} must be numeric for car1")
            times, inverse = np.unique(values, return_inverse=True)
            positions = torch.as_tensor(inverse.ravel(), dtype=torch.long)
        pairs = codes * (int(positions.max()) + 1) + positions
        if torch.unique(pairs).numel() != n:
            where = f" of subject column {subject!r}" if subject is not None else ""
            fail(f"{key}.time: two rows{where} share the same time {time!r}; "
                 "each subject needs distinct times (or name a subject column)")
        return TimeAxis(codes, positions, int(positions.max()) + 1, times)

    def module(self, frame: pd.DataFrame, axis: TimeAxis | None, key: str):
        """The residual covariance module of the rows of ``frame`` (``axis``: their
        :meth:`time_axis`, by default that of ``frame``)."""
        s, n = self.structure, len(frame)
        if s == "scalar":
            return ScalarMatrix(n)
        if s == "identity":
            return IdentityMatrix(n)
        if s == "ar1xar1_nugget":
            return _grid_model(frame, self.get("row"), self.get("col"), key)
        axis = self.time_axis(frame, key) if axis is None else axis
        leaf = (CAR1Matrix(torch.as_tensor(axis.times, dtype=torch.float64)) if s == "car1"
                else _WITHIN[s](axis.size))
        return Grouped(within=leaf, groups=axis.subjects, positions=axis.positions)


def _grid_model(frame, row, col, key):
    rows, r_codes = np.unique(frame[row].to_numpy(), return_inverse=True)
    cols, c_codes = np.unique(frame[col].to_numpy(), return_inverse=True)
    n, R, C = len(frame), len(rows), len(cols)
    if n != R * C:
        fail(f"{key}: ar1xar1_nugget needs one row per cell of a complete {row} x {col} grid; "
             f"found {n} rows for {R} x {C} = {R * C} cells")
    if not np.array_equal(r_codes.ravel() * C + c_codes.ravel(), np.arange(n)):
        fail(f"{key}: rows must be in row-major grid order (sorted by {row}, then {col}) "
             "with one row per cell; use ModelSpec.prepare")
    model = Sum(field=KroneckerProduct(row=AR1Matrix(R), col=AR1Matrix(C)), nugget=ScalarMatrix(n))
    model.fix("field/col/sigma^2", 1.0)
    return model
