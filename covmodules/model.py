r"""The linear mixed model's marginal covariance :math:`V = \sum_i Z_i G_i Z_i^T + R`."""

from __future__ import annotations

import torch
from torch import nn

from .base import CovarianceModule
from .operators.base import Operator
from .structures.block_design import BlockDesignMatrix, block_pattern
from .structures.design_matrix import DesignMatrix
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
        covariances, designs, levels, terms = {}, {}, {}, {}
        for name, term in random.items():
            if not (isinstance(term, tuple) and len(term) == 2):
                raise TypeError(f"random[{name!r}] must be a tuple (Z, G)")
            Z, G = term
            levels[name], terms[name] = getattr(Z, "levels", None), getattr(Z, "terms", None)
            designs[name], covariances[name] = _design_module(name, Z, G), G
        super().__init__({**covariances, "residual": residual})
        self.designs = nn.ModuleDict(designs)
        self.levels, self.terms = levels, terms
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
        another pattern. No dense ``Z`` is formed for a block design (a ``DesignMatrix`` or a
        design from :func:`covmodules.design.random_design`).
        """
        module = self.designs[name]
        n, q = module.shape
        if q % k:
            return None
        if isinstance(module, BlockDesignMatrix):
            return (module.codes, module.values) if module.k == k else None
        return block_pattern(self.design(name), k)

    def z_matmul(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """``Z W`` for random term ``name`` (no dense ``Z`` for a block design)."""
        Z = self.designs[name]
        if isinstance(Z, BlockDesignMatrix):
            return Z.product(W)
        return self.design(name).to(W) @ W

    def zt_matmul(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """``Zᵀ W`` for random term ``name``."""
        Z = self.designs[name]
        if isinstance(Z, BlockDesignMatrix):
            return Z.transposed_product(W)
        return self.design(name).to(W).T @ W

    def _terms(self, nat):
        """``(name, G module, its parameters)`` of each random term."""
        *parts, _ = self._split(nat)
        return zip(self.term_names, self.operand_modules[:-1], parts)

    def kronecker_view(self):
        """The residual's Kronecker view when there are no random terms (``V = R``)."""
        return None if self.term_names else self._modules["residual"].kronecker_view()

    def _evaluate(self, nat):
        *Gs, R = self._operand_values(nat)
        V = R.clone()
        for name, G in zip(self.term_names, Gs):
            ZG = self.z_matmul(name, G.to(V))                         # (n, q)
            V += self.z_matmul(name, ZG.T)                            # Z (Z G)ᵀ = Z Gᵀ Zᵀ
        return V

    def _vjp(self, nat, G):
        out = []
        for name, g, part in self._terms(nat):
            ZtG = self.zt_matmul(name, G)                             # (q, n)
            out.append(g._vjp(part, self.zt_matmul(name, ZtG.T).T))  # Zᵀ G Z
        return torch.cat(out + [self.operand_modules[-1]._vjp(self._split(nat)[-1], G)])

    def _dv_matmul(self, nat, W, transpose=False):
        out = []
        for name, g, part in self._terms(nat):
            inner = g._dv_matmul(part, self.zt_matmul(name, W), transpose)   # (K, q, r)
            K, q, r = inner.shape
            rows = self.z_matmul(name, inner.permute(1, 0, 2).reshape(q, K * r))
            out.append(rows.reshape(-1, K, r).permute(1, 0, 2))
        return torch.cat(out + [self.operand_modules[-1]._dv_matmul(self._split(nat)[-1], W,
                                                                     transpose)])


def _design_module(name: str, Z, G) -> CovarianceModule:
    """``Z`` as a module; a dense ``Z`` with one block of ``k`` columns per level, ``G`` being
    ``I ⊗ S`` with ``S`` of size ``k``, becomes a :class:`BlockDesignMatrix` (codes and values)."""
    if hasattr(Z, "group_codes") and hasattr(Z, "term_matrix"):       # design.random_design
        return BlockDesignMatrix(Z.group_codes, Z.term_matrix, Z.num_levels)
    if isinstance(Z, DesignMatrix):
        return BlockDesignMatrix(Z.codes, torch.ones(Z.shape[0], 1), Z.shape[1])
    if isinstance(Z, CovarianceModule):
        if Z.num_free_params:
            raise ValueError(f"Z of random term {name!r} must have no free parameters")
        return Z
    view = G.repeated_block_view() if isinstance(G, CovarianceModule) else None
    if (view is not None and isinstance(Z, torch.Tensor) and Z.dim() == 2
            and Z.shape[1] == view.count * view.block.shape[0]):
        rows = block_pattern(Z, view.block.shape[0])
        if rows is not None:
            codes, values = rows
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"Z of random term {name!r} contains NaN or inf")
            return BlockDesignMatrix(codes.clamp(min=0), values, view.count)
    return FixedMatrix(Z, name=f"Z of random term {name!r}")
