"""Container covariance modules: naming, parameter bookkeeping and shape checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..base import CovarianceModule, ParamSpec
from ..structures.fixed import FixedMatrix

__all__ = ["Operator", "stack_rows", "consecutive_slices"]


def _parse_operands(args, kwargs) -> list[tuple[str, object]]:
    if args and kwargs:
        raise ValueError("give operands either positionally or as keyword arguments, not both")
    if len(args) == 1 and isinstance(args[0], dict):
        return list(args[0].items())
    if kwargs:
        return list(kwargs.items())
    return [(str(i), a) for i, a in enumerate(args)]


class Operator(CovarianceModule):
    """Base of the container modules.

    Operands are covariance modules or fixed tensors, given as keyword arguments
    (``time=AR1Matrix(3)``), as a single dict, or positionally (named ``"0"``, ``"1"``, ...).
    Parameter names are prefixed with the operand name: ``time/rho``, nesting to any depth.
    Two operands may not share a parameter (the flat parameter vector would hold it twice).
    Subclasses set ``min_operands`` / ``max_operands`` and implement ``shape``,
    ``_check_shapes``, ``_evaluate``, ``_vjp`` and ``_dv_matmul``.
    """

    min_operands = 2
    max_operands: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__()
        operands = _parse_operands(args, kwargs)
        n, lo, hi = len(operands), self.min_operands, self.max_operands
        if n < lo or (hi is not None and n > hi):
            need = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}-{hi}"
            raise ValueError(f"{type(self).__name__} needs {need} operands, got {n}")
        self._operand_names: list[str] = []
        for name, operand in operands:
            self._add_operand(name, operand)
        self._check_shapes([op.shape for op in self.operand_modules])
        self._operand_sizes = [op.num_params for op in self.operand_modules]

    def _add_operand(self, name, operand) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"operand names must be non-empty strings, got {name!r}")
        if "/" in name or "." in name:
            raise ValueError(f"operand name {name!r} must not contain '/' or '.'")
        if name in self._operand_names or hasattr(self, name):
            raise ValueError(f"duplicate or reserved operand name {name!r}")
        if isinstance(operand, (torch.Tensor, np.ndarray)):
            operand = FixedMatrix(operand, name=f"operand {name!r}")
        elif not isinstance(operand, CovarianceModule):
            raise TypeError(f"operand {name!r} must be a CovarianceModule or a tensor, "
                            f"got {type(operand).__name__}")
        owned = {id(t) for op in self.operand_modules for t in op._raw_tensors()}
        if any(id(t) in owned for t in operand._raw_tensors()):
            raise ValueError(f"operand {name!r} shares parameters with another operand; "
                             "pass a separate module (e.g. copy.deepcopy) for each operand")
        self.add_module(name, operand)
        self._operand_names.append(name)

    def _check_shapes(self, shapes: list[tuple[int, int]]) -> None:
        """Raise ``ValueError`` when the operand shapes do not fit the operator."""

    # ------------------------------------------------------------------ bookkeeping
    @property
    def operand_modules(self) -> list[CovarianceModule]:
        return [self._modules[n] for n in self._operand_names]

    @property
    def operands(self) -> dict[str, object]:
        """Operand name -> covariance module (or the tensor for a fixed operand)."""
        return {n: (op.value if isinstance(op, FixedMatrix) else op)
                for n, op in zip(self._operand_names, self.operand_modules)}

    @property
    def param_specs(self) -> list[ParamSpec]:
        return [replace(s, name=f"{n}/{s.name}")
                for n, op in zip(self._operand_names, self.operand_modules)
                for s in op.param_specs]

    def _raw_tensors(self) -> list[torch.Tensor]:
        return [t for op in self.operand_modules for t in op._raw_tensors()]

    def sign_reflections(self) -> dict[int, list[int]]:
        out, offset = {}, 0
        for op in self.operand_modules:
            out.update({offset + i: [offset + j for j in js]
                        for i, js in op.sign_reflections().items()})
            offset += op.num_params
        return out

    def _set_fixed(self, name: str, fixed: bool) -> None:
        head, rest = name.split("/", 1)
        self._modules[head]._set_fixed(rest, fixed)

    def _split(self, nat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(nat, self._operand_sizes))

    def _operand_values(self, nat: torch.Tensor) -> list[torch.Tensor]:
        return [op._evaluate(part) for op, part in zip(self.operand_modules, self._split(nat))]

    def _factors(self, nat: torch.Tensor):
        """Operand values (cached per parameter vector) and parameter slices.

        For operators whose operands are small next to ``V`` (Kronecker factors, ``Z`` and
        ``G``): the backward pass reuses the forward's values instead of rebuilding them.
        """
        values = self.get_intermediates(nat)
        if values is None:
            values = self._operand_values(nat)
            self.set_intermediates(nat, values)
        return values, self._split(nat)

    # -------------------------------------------------------------------- public API
    def build_operands(self, free_params=None) -> dict[str, torch.Tensor]:
        """Each operand's matrix at ``free_params`` (registered values when omitted)."""
        nat = self.build_params(free_params)
        return dict(zip(self._operand_names, self._operand_values(nat)))

    def operands_grad(self, free_params=None) -> dict[str, tuple]:
        """Each operand's Jacobian ``(J, names)`` at its share of ``free_params``."""
        free = self._resolve_free(free_params)
        out, start = {}, 0
        for name, op in zip(self._operand_names, self.operand_modules):
            k = op.num_free_params
            out[name] = op.manual_grad(free[start:start + k] if k else None)
            start += k
        return out

    @property
    def repr_dict(self) -> dict[str, object]:
        """Operand name -> operand, as shown by ``repr``."""
        return dict(zip(self._operand_names, self.operand_modules))


def stack_rows(blocks: list[torch.Tensor], row_slices: list[slice], rows: int) -> torch.Tensor:
    """Place ``(k_i, rows_i, r)`` blocks in their row ranges of ``(sum k_i, rows, r)`` zeros."""
    r = blocks[0].shape[-1]
    out = blocks[0].new_zeros(sum(b.shape[0] for b in blocks), rows, r)
    k = 0
    for b, s in zip(blocks, row_slices):
        out[k:k + b.shape[0], s] = b
        k += b.shape[0]
    return out


def consecutive_slices(sizes: list[int]) -> list[slice]:
    """Back-to-back ranges of the given sizes: ``[2, 3] -> [slice(0, 2), slice(2, 5)]``."""
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out
