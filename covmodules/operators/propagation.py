r"""Covariance propagated through a design matrix: :math:`\mathbf{V} = \mathbf{Z G Z}^\top`.

``Z`` is ``n x q`` (a fixed tensor or a module, e.g. a ``DesignMatrix``), ``G`` is ``q x q``.
With ``dV = Z dG Zᵀ + dZ G Zᵀ + Z G dZᵀ`` the cotangents are

- ``G``: ``Zᵀ Ḡ Z``;
- ``Z`` (when it has parameters): ``Ḡ Z Gᵀ + Ḡᵀ Z G``;

and the products ``dV W`` are ``Z (dG (Zᵀ W))`` and ``dZ (G Zᵀ W) + Z G (dZᵀ W)``
(transposed: ``Z (dGᵀ (Zᵀ W))`` and ``dZ (Gᵀ Zᵀ W) + Z Gᵀ (dZᵀ W)``). Nothing of size
``K x n x n`` is formed.
"""

import torch

from .base import Operator


class CovariancePropagation(Operator):
    r"""Random-effect covariance on the data scale, :math:`\mathbf{V} = \mathbf{Z G Z}^\top`.

    Exactly two operands, ``Z`` first and ``G`` second (positionally, as a dict or as
    keywords): ``Z`` an ``n x q`` design matrix (tensor or module), ``G`` a ``q x q``
    covariance module. ``Sum(u=CovariancePropagation(Z, G), e=ScalarMatrix(n))`` is the
    marginal covariance ``Z G Zᵀ + σ² I`` of a linear mixed model.

    Example::

        >>> import torch
        >>> from covmodules import CovariancePropagation, ScalarMatrix
        >>> Z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])   # 3 rows, 2 subjects
        >>> V = CovariancePropagation(Z=Z, subject=ScalarMatrix(2))
        >>> V(torch.tensor([0.5]))
        tensor([[2.7183, 2.7183, 0.0000],
                [2.7183, 2.7183, 0.0000],
                [0.0000, 0.0000, 2.7183]])
        >>> V.free_param_names
        ['subject/sigma^2']
    """

    min_operands = max_operands = 2

    @property
    def shape(self):
        n = self.operand_modules[0].shape[0]
        return (n, n)

    def _check_shapes(self, shapes):
        (_, q), (g1, g2) = shapes
        if g1 != g2:
            raise ValueError(f"CovariancePropagation: G must be square, got {g1} x {g2}")
        if q != g1:
            raise ValueError(f"CovariancePropagation: Z has {q} columns but G is {g1} x {g2}")

    def _evaluate(self, nat):
        (Z, G), _ = self._factors(nat)
        return (Z @ G) @ Z.T

    def _vjp(self, nat, Gbar):
        (Z, G), (nz, ng) = self._factors(nat)
        z, g = self.operand_modules
        Gbar_Z = Gbar @ Z
        out_g = g._vjp(ng, Z.T @ Gbar_Z) if g.num_params else ng.new_zeros(0)
        if not z.num_params:
            return out_g
        out_z = z._vjp(nz, Gbar_Z @ G.T + Gbar.T @ (Z @ G))
        return torch.cat([out_z, out_g])

    def _dv_matmul(self, nat, W, transpose=False):
        (Z, G), (nz, ng) = self._factors(nat)
        z, g = self.operand_modules
        if transpose:
            G = G.T
        Zt_W = Z.T @ W
        out_g = Z @ g._dv_matmul(ng, Zt_W, transpose)
        if not z.num_params:
            return out_g
        out_z = z._dv_matmul(nz, G @ Zt_W) + (Z @ G) @ z._dv_matmul(nz, W, transpose=True)
        return torch.cat([out_z, out_g])
