"""Kronecker product of two covariance matrices."""

import torch

from ..capabilities import KroneckerView, RepeatedBlock, is_identity
from .base import Operator


class KroneckerProduct(Operator):
    r"""Kronecker product :math:`\mathbf{V} = \mathbf{A} \otimes \mathbf{B}`.

    If ``A`` is ``m1 x m2`` and ``B`` is ``n1 x n2`` the result is ``m1 n1 x m2 n2``, with
    row ``i n1 + j`` for row ``i`` of ``A`` and ``j`` of ``B``. Operands are covariance modules
    or fixed tensors, given as exactly two positional arguments, a dict, or two keywords; the
    first is ``A``.

    Capabilities: ``A ⊗ B`` of square factors offers a
    :class:`~covmodules.capabilities.KroneckerView` (the Kronecker solver), and ``I_L ⊗ S`` a
    :class:`~covmodules.capabilities.RepeatedBlock` with block ``S`` (the grouped solver).

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

    def kronecker_view(self):
        """``A ⊗ B`` (no nugget) when both factors are square; a factor that is itself a
        Kronecker product without nugget contributes its own factors (``A ⊗ (B ⊗ C)`` has
        three)."""
        parts = [_factor_view(op) for op in self.operand_modules]
        if None in parts:
            return None
        d = len(parts[0].sizes)

        def values(nat):
            na, nb = self._split(nat)
            return (*parts[0].values(na)[0], *parts[1].values(nb)[0]), 0.0

        def vjp(nat, grads, trace):
            na, nb = self._split(nat)
            return torch.cat([parts[0].vjp(na, grads[:d], 0.0), parts[1].vjp(nb, grads[d:], 0.0)])

        def jacobian(nat, i):
            na, nb = self._split(nat)
            if i < d:
                return parts[0].jacobian(na, i)
            start, J = parts[1].jacobian(nb, i - d)
            return start + na.numel(), J

        def eigh(nat, i, A):
            na, nb = self._split(nat)
            return parts[0].eigh(na, i, A) if i < d else parts[1].eigh(nb, i - d, A)

        return KroneckerView(parts[0].sizes + parts[1].sizes, values, vjp, jacobian,
                             eigh)

    def repeated_block_view(self):
        """``I_L ⊗ S`` when the first factor is the identity: the block is ``S``, whose
        parameters are all of this product's."""
        a, b = self.operand_modules
        return RepeatedBlock(a.shape[0], b) if is_identity(a) else None


def _factor_view(op):
    """``op`` as Kronecker factors: its own view when it is a product without nugget, else
    the one square factor ``op`` (``None`` when not square), eigendecomposed by its own
    ``_eigh`` where it has one."""
    view = op.kronecker_view()
    if view is not None and not view.nugget:
        return view
    if op.shape[0] != op.shape[1]:
        return None
    eigh = getattr(op, "_eigh", lambda nat, A: torch.linalg.eigh(A))
    return KroneckerView((op.shape[0],), lambda nat: ((op._evaluate(nat),), 0.0),
                         lambda nat, grads, trace: op._vjp(nat, grads[0]),
                         lambda nat, i: (0, op._jacobian(nat)),
                         lambda nat, i, A: eigh(nat, A))
