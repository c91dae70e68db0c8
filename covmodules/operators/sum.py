"""Sum of covariance matrices."""

import torch

from .base import Operator


class Sum(Operator):
    r"""Sum :math:`\mathbf{V} = \sum_i \mathbf{V}_i` of two or more same-shape operands.

    Each operand receives the cotangent unchanged in the backward pass.

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
