"""Rows that ``V`` cannot tell apart: a singular ``V`` by construction, found before a fit.

Two rows that every additive piece of ``V`` treats alike (two rows of a group at one position
of a ``Grouped`` structure, a repeated time of a ``CAR1Matrix``) give ``V`` two equal rows
unless a diagonal term separates them; :func:`covmodules.checks.prepare` refuses such data.
"""

from __future__ import annotations

import torch

from .model import MixedModel
from .operators.block_diagonal import BlockDiagonal
from .operators.gram import Gram
from .operators.grouped import Grouped
from .operators.hadamard import HadamardProduct
from .operators.kronecker import KroneckerProduct
from .operators.sum import Sum
from .structures.block_design import BlockDesignMatrix
from .structures.car1 import CAR1Matrix
from .structures.equal_entry import EqualEntryMatrix
from .structures.fixed import FixedMatrix

__all__ = ["identical_rows", "grouped_row_classes", "check_distinct_rows"]


def identical_rows(module) -> torch.Tensor | None:
    """A class per row of ``module``'s matrix such that rows of one class are identical for
    every parameter value (on the CPU); ``None`` when no two rows are known to be.

    Rows of a sum (or Hadamard product) are identical when they are in every operand; a
    diagonal structure separates every row. Known: ``Grouped`` (one group and position),
    ``CAR1Matrix`` (one time), ``EqualEntryMatrix`` (all rows), the rows of ``Z`` of a random
    term, fixed matrices and Gram matrices (equal rows), Kronecker products, block diagonals.

    >>> from covmodules import AR1Matrix, Grouped, ScalarMatrix, Sum
    >>> V = Grouped(AR1Matrix(3), groups=[0, 0, 1], positions=[1, 1, 0])
    >>> identical_rows(V)
    tensor([0, 0, 1])
    >>> identical_rows(Sum(serial=V, nugget=ScalarMatrix(3))) is None
    True
    """
    if isinstance(module, MixedModel):
        return _meet([lambda: identical_rows(module.operand_modules[-1])]
                     + [lambda name=name: _design_rows(module, name)
                        for name in module.term_names])
    if isinstance(module, (Sum, HadamardProduct)):
        return _meet(lambda op=op: identical_rows(op) for op in module.operand_modules)
    if isinstance(module, Grouped):
        return grouped_row_classes(module.group_codes, module.positions,
                                   module.operand_modules[0])
    if isinstance(module, CAR1Matrix):
        return _classes(module.times[:, None])
    if isinstance(module, EqualEntryMatrix):
        return torch.zeros(module.shape[0], dtype=torch.long)
    if isinstance(module, FixedMatrix):
        return _classes(module.value)
    if isinstance(module, Gram) and module.form == "XXt":
        return identical_rows(module.operand_modules[0])
    if isinstance(module, KroneckerProduct):
        A, B = module.operand_modules
        a, b = identical_rows(A), identical_rows(B)
        if a is None and b is None:
            return None
        a = torch.arange(A.shape[0]) if a is None else a
        b = torch.arange(B.shape[0]) if b is None else b
        return _classes(torch.stack([a.repeat_interleave(B.shape[0]), b.repeat(A.shape[0])], 1))
    if isinstance(module, BlockDiagonal):
        blocks = [identical_rows(op) for op in module.operand_modules]
        if all(c is None for c in blocks):
            return None
        out, offset = [], 0
        for op, c in zip(module.operand_modules, blocks):
            out.append(offset + (torch.arange(op.shape[0]) if c is None else c))
            offset += op.shape[0]
        return torch.cat(out)
    return None


def grouped_row_classes(codes, positions, structure) -> torch.Tensor | None:
    """:func:`identical_rows` of ``Grouped(structure, codes, positions)``: one group and a
    position (or positions whose rows of ``structure`` are identical)."""
    inner = identical_rows(structure)
    positions = positions.cpu()
    return _classes(torch.stack([codes.cpu(), positions if inner is None else inner[positions]],
                                1))


def check_distinct_rows(classes: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first two rows in one class of :func:`identical_rows`:
    ``V`` is then singular for every parameter value."""
    if classes is None:
        return
    n = classes.numel()
    rows = torch.arange(n)
    first = torch.full((n,), n).scatter_reduce(0, classes, rows, "amin")[classes]
    repeats = torch.nonzero(first != rows)[:, 0]
    if repeats.numel():
        j, more = int(repeats[0]), repeats.numel() - 1
        also = f" (and {more} more row(s) repeating an earlier one)" if more else ""
        raise ValueError(
            f"V is singular (not positive definite) for every parameter value: rows "
            f"{int(first[j])} and {j}{also} are identical in every piece of V, e.g. two rows "
            "of one group at the same position of a Grouped structure, or a repeated time of a "
            "CAR1Matrix. Add a diagonal term that separates them (a nugget: Sum(..., "
            "nugget=ScalarMatrix(n)), or a MixedModel residual=ScalarMatrix(n)), or remove the "
            "repeated rows; checks=Checks(singular_v=False) skips this check")


def _design_rows(model: MixedModel, name: str) -> torch.Tensor | None:
    Z = model.designs[name]
    if isinstance(Z, BlockDesignMatrix):
        return _classes(torch.cat([Z.codes[:, None].to(Z.values), Z.values], 1))
    return _classes(model.design(name))


def _meet(parts) -> torch.Tensor | None:
    """Classes of rows identical in every part; ``parts`` are functions giving each part's
    classes, called only while some rows still share a class."""
    classes = None
    for i, part in enumerate(parts):
        other = part()
        if other is None:
            return None
        classes = other if i == 0 else _classes(torch.stack([classes, other], 1))
        if classes is None:
            return None
    return classes


def _classes(keys: torch.Tensor) -> torch.Tensor | None:
    """Class of each row of ``keys`` (equal rows share one); ``None`` when all differ."""
    classes = torch.unique(keys.detach().cpu(), dim=0, return_inverse=True)[1]
    return None if int(classes.max()) + 1 == keys.shape[0] else classes
