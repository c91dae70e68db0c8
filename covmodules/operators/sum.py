"""Sum of covariance matrices."""

import torch

from ..capabilities import KroneckerView
from .base import Operator


class Sum(Operator):
    r"""Sum :math:`\mathbf{V} = \sum_i \mathbf{V}_i` of two or more same-shape operands.

    Each operand receives the cotangent unchanged in the backward pass. One operand with a
    :class:`~covmodules.capabilities.KroneckerView` plus constant diagonals (``A ⊗ B + σ² I``, any number of factors)
    offers a Kronecker view with the diagonals as its nugget.

    Example::

        >>> from covmodules import AR1Matrix, ScalarMatrix, Sum
        >>> V = Sum(serial=AR1Matrix(3), nugget=ScalarMatrix(3))
        >>> V.free_param_names
        ['serial/sigma^2', 'serial/rho', 'nugget/sigma^2']
        >>> V().diagonal().tolist()
        [2.0, 2.0, 2.0]
    """

    min_operands = 2

    @property
    def shape(self):
        return self.operand_modules[0].shape

    def _check_shapes(self, shapes):
        if len(set(shapes)) != 1:
            raise ValueError(f"Sum operands must have equal shapes, got "
                             f"{dict(zip(self._operand_names, shapes))}")

    def _evaluate(self, nat):
        # accumulate in place, dropping each term at once: at most two n x n live at a time
        (first, *rest), (p0, *parts) = self.operand_modules, self._split(nat)
        out = first._evaluate(p0).clone()
        for op, part in zip(rest, parts):
            out.add_(op._evaluate(part))
        return out

    def _matmul(self, nat, W):
        return sum(op._matmul(part, W) for op, part in zip(self.operand_modules, self._split(nat)))

    def _vjp(self, nat, G):
        return torch.cat([op._vjp(part, G)
                          for op, part in zip(self.operand_modules, self._split(nat))])

    def _dv_matmul(self, nat, W, transpose=False):
        return torch.cat([op._dv_matmul(part, W, transpose)
                          for op, part in zip(self.operand_modules, self._split(nat))])

    def kronecker_view(self):
        """``A ⊗ B + s I``, ``s`` the Kronecker operand's nugget plus the constant diagonals."""
        ops = self.operand_modules
        krons = [op.kronecker_view() for op in ops]
        found = [i for i, view in enumerate(krons) if view is not None]
        if len(found) != 1:
            return None
        k, n = found[0], self.shape[0]
        views = [krons[k] if i == k else op.diagonal_view() for i, op in enumerate(ops)]
        if not all(v is not None and v.constant for i, v in enumerate(views) if i != k):
            return None
        kron = views[k]

        def values(nat):
            parts = self._split(nat)
            factors, s = kron.values(parts[k])
            for i, (view, part) in enumerate(zip(views, parts)):
                if i != k:
                    s = s + view.values(part)[0]
            return factors, s

        def vjp(nat, grads, trace):
            return torch.cat([kron.vjp(part, grads, trace) if i == k
                              else view.trace_vjp(part, trace, n)
                              for i, (view, part) in enumerate(zip(views, self._split(nat)))])

        def jacobian(nat, i):
            parts = self._split(nat)
            start, J = kron.jacobian(parts[k], i)
            return start + sum(part.numel() for part in parts[:k]), J

        def eigh(nat, i, A):
            return kron.eigh(self._split(nat)[k], i, A)

        return KroneckerView(kron.sizes, values, vjp, jacobian, eigh, nugget=True)
