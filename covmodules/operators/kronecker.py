"""Kronecker product of two covariance matrices."""

import torch

from .base import Operator


class KroneckerProduct(Operator):
    r"""Kronecker product :math:`\mathbf{V} = \mathbf{A} \otimes \mathbf{B}`.

    If ``A`` is ``m1 x m2`` and ``B`` is ``n1 x n2`` the result is ``m1 n1 x m2 n2``, with
    row ``i n1 + j`` for row ``i`` of ``A`` and ``j`` of ``B``. Operands are covariance modules
    or fixed tensors, given as exactly two positional arguments, a dict, or two keywords; the
    first is ``A``.

    The backward pass hands ``A`` the cotangent ``G`` reshaped to ``(m1, n1, m2, n2)`` and
    contracted with ``B`` over the ``n`` axes (and symmetrically for ``B``); ``dV(w)`` uses
    ``(A ⊗ B) vec(W) = vec(A W Bᵀ)``. Neither forms a ``(K, N, N)`` Jacobian.

    Example::

        >>> import torch
        >>> from covmodules import AR1Matrix, ScalarMatrix, KroneckerProduct
        >>> op = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(2))
        >>> op(torch.tensor([1.0, 1.0, 1.0]))
        tensor([[54.5982,  0.0000, 25.2307,  0.0000],
                [ 0.0000, 54.5982,  0.0000, 25.2307],
                [25.2307,  0.0000, 54.5982,  0.0000],
                [ 0.0000, 25.2307,  0.0000, 54.5982]])
        >>> op.free_param_names
        ['time/sigma^2', 'time/rho', 'subject/sigma^2']
    """

    min_operands = max_operands = 2

    @property
    def shape(self):
        (m1, m2), (n1, n2) = (op.shape for op in self.operand_modules)
        return (m1 * n1, m2 * n2)

    def _evaluate(self, nat):
        (A, B), _ = self._factors(nat)
        return torch.kron(A, B)

    def _matmul(self, nat, W):
        """``(A ⊗ B) vec(W) = vec(A W Bᵀ)`` through the operands' own products."""
        a, b = self.operand_modules
        na, nb = self._split(nat)
        (m1, m2), (n1, n2), r = a.shape, b.shape, W.shape[1]
        M = b._matmul(nb, W.reshape(m2, n2, r).transpose(0, 1).reshape(n2, m2 * r))
        M = M.reshape(n1, m2, r).transpose(0, 1).reshape(m2, n1 * r)
        return a._matmul(na, M).reshape(m1 * n1, r)

    def _vjp(self, nat, G):
        (A, B), (na, nb) = self._factors(nat)
        a, b = self.operand_modules
        (m1, m2), (n1, n2) = A.shape, B.shape
        G4 = G.reshape(m1, n1, m2, n2)
        # batched (m2 x n2) @ (n2,) and (n2 x m2) @ (m2,) products: G4 is never copied
        grad_a = torch.matmul(G4, B.reshape(1, n1, n2, 1)).sum((1, 3))
        grad_b = torch.matmul(G4.transpose(2, 3), A.reshape(m1, 1, m2, 1)).sum((0, 3))
        return torch.cat([a._vjp(na, grad_a), b._vjp(nb, grad_b)])

    def _dv_matmul(self, nat, W, transpose=False):
        (A, B), (na, nb) = self._factors(nat)
        a, b = self.operand_modules
        if transpose:
            A, B = A.T, B.T
        (m1, m2), (n1, n2), r = A.shape, B.shape, W.shape[1]
        W3 = W.reshape(m2, n2, r)
        # (dA ⊗ B) vec(W): dA @ (W Bᵀ) with the n1 and r axes side by side
        M = torch.einsum("jl,klr->kjr", B, W3).reshape(m2, n1 * r)
        part_a = a._dv_matmul(na, M, transpose).reshape(-1, m1 * n1, r)
        # (A ⊗ dB) vec(W): dB @ (A W) with the m1 and r axes side by side
        M = torch.einsum("ik,klr->lir", A, W3).reshape(n2, m1 * r)
        part_b = b._dv_matmul(nb, M, transpose).reshape(-1, n1, m1, r)
        part_b = part_b.permute(0, 2, 1, 3).reshape(-1, m1 * n1, r)
        return torch.cat([part_a, part_b])
