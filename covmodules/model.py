r"""The linear mixed model's marginal covariance :math:`V = \sum_i Z_i G_i Z_i^T + R`."""

from __future__ import annotations

import torch
from torch import nn

from .base import CovarianceModule
from .operators.base import Operator
from .structures.fixed import FixedMatrix

__all__ = ["MixedModel"]


class MixedModel(Operator):
    r"""Random terms ``(Z_i, G_i)`` plus a residual covariance ``R``.

    .. math:: V = \sum_i Z_i G_i Z_i^T + R

    ``random`` maps a term name to ``(Z, G)``: ``Z`` an ``(n, q)`` tensor, a
    ``DesignMatrix``, or a design object with ``.Z`` and ``.levels`` (e.g. from
    :func:`covmodules.design.random_design`, whose levels then index the BLUPs); ``G`` a
    ``(q, q)`` covariance module. ``residual`` is any ``(n, n)`` covariance module.
    Parameter names are ``<term>/<param>`` and ``residual/<param>``.

    Example (lme4 ``y ~ 1 + (1 | g)`` with 2 groups of 2)::

        >>> import torch
        >>> from covmodules import MixedModel, ScalarMatrix
        >>> Z = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float64)
        >>> model = MixedModel(random={"g": (Z, ScalarMatrix(2))}, residual=ScalarMatrix(4))
        >>> model.free_param_names
        ['g/sigma^2', 'residual/sigma^2']
        >>> model()[0].tolist()
        [2.0, 1.0, 0.0, 0.0]
    """

    min_operands = 1

    def __init__(self, random: dict | None = None, residual: CovarianceModule | None = None):
        random = {} if random is None else random
        if not isinstance(random, dict):
            raise TypeError(f"random must be a dict of name -> (Z, G), got {type(random).__name__}")
        if residual is None:
            raise ValueError("residual is required: a covariance module such as ScalarMatrix(n)")
        if "residual" in random:
            raise ValueError("'residual' is reserved for the residual term; rename the random term")
        covariances, designs, levels, terms, grouped = {}, {}, {}, {}, {}
        for name, term in random.items():
            if not (isinstance(term, tuple) and len(term) == 2):
                raise TypeError(f"random[{name!r}] must be a tuple (Z, G)")
            Z, G = term
            levels[name], terms[name] = getattr(Z, "levels", None), getattr(Z, "terms", None)
            if hasattr(Z, "group_codes") and hasattr(Z, "term_matrix"):
                grouped[name] = (Z.group_codes, Z.term_matrix)
            designs[name], covariances[name] = _design_module(name, getattr(Z, "Z", Z)), G
        super().__init__({**covariances, "residual": residual})
        self.designs = nn.ModuleDict(designs)
        self.levels, self.terms = levels, terms
        self._term_rows = grouped
        n = self.shape[0]
        for name, Z in self.designs.items():
            rows, cols = Z.shape
            q = self._modules[name].shape
            if rows != n:
                raise ValueError(f"Z of random term {name!r} has {rows} rows, but the residual "
                                 f"is {n} x {n}")
            if q != (cols, cols):
                raise ValueError(f"G of random term {name!r} has shape {q}, but Z has {cols} "
                                 f"columns")

    @property
    def term_names(self) -> list[str]:
        return self._operand_names[:-1]

    @property
    def shape(self):
        return self._modules["residual"].shape

    def _check_shapes(self, shapes):
        residual = shapes[-1]
        if residual[0] != residual[1]:
            raise ValueError(f"residual must be square, got shape {residual}")

    def design(self, name: str) -> torch.Tensor:
        """The dense ``Z`` of random term ``name``."""
        Z = self.designs[name]
        return Z._evaluate(Z.build_params())

    def term_groups(self, name: str, k: int):
        """``(level, values)`` when ``Z`` of term ``name`` has one block of ``k`` columns per level.

        Row ``i`` of ``Z`` is ``values[i]`` in the columns ``level[i] k, ..., level[i] k + k-1``
        and zero elsewhere (``level[i] = -1`` for a row of zeros); ``None`` when ``Z`` has
        another pattern. No dense ``Z`` is formed for a ``DesignMatrix`` or a design from
        :func:`covmodules.design.random_design`.
        """
        module = self.designs[name]
        n, q = module.shape
        if q % k:
            return None
        if name in self._term_rows:
            codes, values = self._term_rows[name]
            if values.shape[1] == k:
                return codes.long(), values
        codes = getattr(module, "codes", None)
        if k == 1 and isinstance(codes, torch.Tensor) and codes.shape == (n,):
            return codes, torch.ones(n, 1, dtype=module._dtype())
        Z = self.design(name).reshape(n, q // k, k)
        nonzero = (Z != 0).any(2)
        count = nonzero.sum(1)
        if bool((count > 1).any()):
            return None
        level = torch.where(count == 1, nonzero.to(torch.int8).argmax(1), -1)
        values = Z[torch.arange(n), level.clamp(min=0)] * (count == 1)[:, None]
        return level, values

    def _designs(self, dtype):
        return [self.design(name).to(dtype) for name in self.term_names]

    def _evaluate(self, nat):
        *Gs, R = self._operand_values(nat)
        V = R.clone()
        for Z, G in zip(self._designs(nat.dtype), Gs):
            V += Z @ G @ Z.T
        return V

    def _vjp(self, nat, G):
        *parts, part_r = self._split(nat)
        *gs, r = self.operand_modules
        out = [g._vjp(p, Z.T @ G @ Z) for g, p, Z in zip(gs, parts, self._designs(nat.dtype))]
        return torch.cat(out + [r._vjp(part_r, G)])

    def _dv_matmul(self, nat, W, transpose=False):
        *parts, part_r = self._split(nat)
        *gs, r = self.operand_modules
        out = [Z @ g._dv_matmul(p, Z.T @ W, transpose)
               for g, p, Z in zip(gs, parts, self._designs(nat.dtype))]
        return torch.cat(out + [r._dv_matmul(part_r, W, transpose)])


def _design_module(name: str, Z) -> CovarianceModule:
    if isinstance(Z, CovarianceModule):
        if Z.num_free_params:
            raise ValueError(f"Z of random term {name!r} must have no free parameters")
        return Z
    return FixedMatrix(Z, name=f"Z of random term {name!r}")
