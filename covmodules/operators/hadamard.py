r"""Element-wise (Hadamard) product of two covariance matrices.

:math:`\mathbf{V} = \mathbf{A} \circ \mathbf{B}`, ``V_ij = A_ij B_ij``, for equal shapes or
with one ``1 x 1`` operand broadcast over the other (``V = a B``). The Schur product theorem
keeps ``V`` positive semi-definite when both operands are.

Cotangents: ``G ∘ B`` for ``A`` and ``G ∘ A`` for ``B`` (summed to ``<G, B>`` for a ``1 x 1``
operand). Products: ``(dA ∘ B) W`` needs ``dA`` element-wise, so it uses ``A``'s own
(operand-sized) Jacobian; with ``B`` a ``1 x 1`` scalar it is ``b (dA W)`` and with ``A``
one it is ``da (B W)``.
"""

import math

import numpy as np
import torch

from .base import Operator


def _is_scalar(shape) -> bool:
    return tuple(shape) == (1, 1)


class HadamardProduct(Operator):
    r"""Element-wise product :math:`\mathbf{V} = \mathbf{A} \circ \mathbf{B}` of two operands.

    Operands are covariance modules or fixed tensors of equal shape; either may be a scalar
    (a one-element tensor such as ``torch.tensor(5.0)``, ``torch.tensor([5.0])`` or a
    ``1 x 1`` one, or a ``1 x 1`` module such as ``ScalarMatrix(1)``) that broadcasts.
    ``HadamardProduct(scale=ScalarMatrix(1), K=K)`` is a known relationship matrix ``K`` with
    its own variance ``sigma^2 K``; ``HadamardProduct(AR1Matrix(n), K)`` modulates a known
    correlation by a serial one.

    Example::

        >>> import torch
        >>> from covmodules import HadamardProduct, ScalarMatrix
        >>> K = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
        >>> V = HadamardProduct(genetic=ScalarMatrix(1), K=K)
        >>> V(torch.tensor([0.5]))
        tensor([[2.7183, 1.3591],
                [1.3591, 2.7183]])
        >>> V.free_param_names
        ['genetic/sigma^2']
    """

    min_operands = max_operands = 2

    def _add_operand(self, name, operand):
        if (isinstance(operand, (torch.Tensor, np.ndarray)) and operand.ndim < 2
                and math.prod(operand.shape) == 1):
            operand = operand.reshape(1, 1)
        super()._add_operand(name, operand)

    @property
    def shape(self):
        sa, sb = (op.shape for op in self.operand_modules)
        return sb if _is_scalar(sa) else sa

    def _check_shapes(self, shapes):
        sa, sb = shapes
        if sa != sb and not _is_scalar(sa) and not _is_scalar(sb):
            raise ValueError(f"HadamardProduct operands must have equal shapes (or one 1 x 1), "
                             f"got {dict(zip(self._operand_names, shapes))}")

    def _evaluate(self, nat):
        A, B = self._operand_values(nat)
        return A * B

    def _vjp(self, nat, G):
        values, parts = self._operand_values(nat), self._split(nat)
        out = []
        for op, part, other in zip(self.operand_modules, parts, values[::-1]):
            if op.num_params == 0:
                out.append(part.new_zeros(0))
            elif _is_scalar(op.shape) and not _is_scalar(G.shape):
                out.append(op._vjp(part, torch.tensordot(G, other, dims=2).reshape(1, 1)))
            else:
                out.append(op._vjp(part, G * other))
        return torch.cat(out)

    def _dv_matmul(self, nat, W, transpose=False):
        values, parts = self._operand_values(nat), self._split(nat)
        rows = self.shape[1] if transpose else self.shape[0]
        out = []
        for op, part, other in zip(self.operand_modules, parts, values[::-1]):
            if op.num_params == 0:
                out.append(W.new_zeros(0, rows, W.shape[1]))
            elif _is_scalar(op.shape):
                other_w = (other.T if transpose else other) @ W
                out.append(op._jacobian(part) * other_w)
            elif _is_scalar(other.shape):
                out.append(op._dv_matmul(part, W, transpose) * other)
            else:
                J = op._jacobian(part) * other
                out.append((J.transpose(1, 2) if transpose else J) @ W)
        return torch.cat(out)
