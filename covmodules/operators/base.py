"""Container covariance modules: naming, parameter bookkeeping and shape checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..base import CovarianceModule, ParamSpec
from ..param import NameDict
from ..structures.fixed import FixedMatrix

__all__ = ["Operator", "OperandList", "OperandGrads", "stack_rows", "consecutive_slices"]


def _parse_operands(args, kwargs) -> list[tuple[str, object]]:
    """``(name, operand)`` pairs; positional operands are named ``"0"``, ``"1"``, ..."""
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
    (``time=AR1Matrix(3)``), as a single dict, or positionally (named ``"0"``, ``"1"``, ...;
    torch-openreml's ``op_0``, ``op_1``, ... are accepted as aliases in parameter names).
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
        self._positional = bool(args) and not (len(args) == 1 and isinstance(args[0], dict))
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
    def operands(self) -> NameDict:
        """Operand name -> covariance module (or the tensor for a fixed operand); positional
        operands are also found as ``op_0``, ..."""
        return NameDict({n: (op.value if isinstance(op, FixedMatrix) else op)
                         for n, op in zip(self._operand_names, self.operand_modules)},
                        {self._operand_alias(n): n for n in self._operand_names})

    def _spec_list(self) -> list[ParamSpec]:
        out = []
        for n, op in zip(self._operand_names, self.operand_modules):
            a = self._operand_alias(n)
            out += [replace(s, name=f"{n}/{s.name}",
                            alias=f"{a}/{s.alias or s.name}" if a != n or s.alias else None)
                    for s in op._spec_list()]
        return out

    def _operand_alias(self, name: str) -> str:
        """torch-openreml's name of an operand: ``op_0``, ... for positional ones."""
        return f"op_{name}" if self._positional else name

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
    def build_operands(self, free_params=None) -> "OperandList":
        """Each operand's matrix at ``free_params`` (registered values when omitted), as
        torch-openreml's list in operand order; ``[name]`` looks one up by operand name."""
        nat = self.build_params(free_params)
        return OperandList(self, self._operand_values(nat))

    def operands_grad(self, free_params=None) -> "OperandGrads":
        """torch-openreml's ``(grads, names)``: per operand its Jacobian (``None`` for a
        fixed one) and its parameter names prefixed with the operand's name. ``[name]`` gives
        one operand's ``(J, names)`` with its own names."""
        free = self._resolve_free(free_params)
        out, start = [], 0
        for op in self.operand_modules:
            k = op.num_free_params
            out.append(op.grad(free[start:start + k]))
            start += k
        return OperandGrads(self, out)

    def call_tree(self, free_params=None) -> tuple[dict, dict]:
        """``(matrices, free_params)`` by path: ``"/"`` is this operator, ``"name"`` an
        operand, ``"name/child"`` an operand's operand; a fixed operand's parameters are
        ``None``."""
        return self._tree(free_params, lambda module, free: module(free))

    def grad_tree(self, free_params=None) -> tuple[dict, dict]:
        """:meth:`call_tree` with each module's :meth:`grad` ``(J, names)`` (its own names)
        in place of its matrix."""
        return self._tree(free_params, lambda module, free: module.grad(free))

    def _tree(self, free_params, fn) -> tuple[NameDict, NameDict]:
        """``fn(module, its free parameters)`` and those parameters by path; positional
        operands' paths are also found under torch-openreml's ``op_0``, ..."""
        free = self._resolve_free(free_params)
        values, params, aliases, start = {"/": fn(self, free)}, {"/": free}, {}, 0
        for name, op in zip(self._operand_names, self.operand_modules):
            part = free[start:start + op.num_free_params]
            start += op.num_free_params
            if isinstance(op, Operator):
                child_values, child_params = op._tree(part, fn)
                child_aliases = {k: k for k in child_values} | child_values.aliases
            else:
                child_values = {"/": fn(op, part)}
                child_params = {"/": None if isinstance(op, FixedMatrix) else part}
                child_aliases = {"/": "/"}
            alias = self._operand_alias(name)
            for path, target in child_aliases.items():
                key = name if target == "/" else f"{name}/{target}"
                if path == target:
                    values[key], params[key] = child_values[path], child_params[path]
                aliases[alias if path == "/" else f"{alias}/{path}"] = key
        return NameDict(values, aliases), NameDict(params, aliases)

    def _operand_index(self, name: str) -> int:
        for i, n in enumerate(self._operand_names):
            if name in (n, self._operand_alias(n)):
                return i
        raise KeyError(f"unknown operand {name!r}; operands: {self._operand_names}")

    @property
    def repr_dict(self) -> dict[str, object]:
        """Operand name -> operand, as shown by ``repr``."""
        return dict(zip(self._operand_names, self.operand_modules))


class OperandList(list):
    """Operand values in operand order that also look up by operand name (``[name]``)."""

    def __init__(self, operator: Operator, values):
        super().__init__(values)
        self._operator = operator

    def __getitem__(self, key):
        if isinstance(key, str):
            key = self._operator._operand_index(key)
        return super().__getitem__(key)


class OperandGrads(tuple):
    """torch-openreml's ``(grads, names)`` of :meth:`Operator.operands_grad`; ``[name]`` is
    one operand's ``(J, names)`` with its own parameter names."""

    def __new__(cls, operator: Operator, results):
        names = [[f"{n}/{k}" for k in r[1]] for n, r in zip(operator._operand_names, results)]
        self = super().__new__(cls, ([r[0] for r in results], names))
        self._operator, self._results = operator, list(results)
        return self

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._results[self._operator._operand_index(key)]
        return super().__getitem__(key)


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
