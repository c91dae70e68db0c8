r"""Column concatenation of design matrices.

:math:`\mathbf{V} = [\mathbf{A}_1, \dots, \mathbf{A}_k]` for operands with equal row counts;
operand ``i`` occupies columns ``C_i``. Its cotangent is ``G[:, C_i]``;
``dV/dθ @ W = dA_i/dθ @ W[C_i]`` and ``dV/dθᵀ @ W`` is ``dA_i/dθᵀ @ W`` on rows ``C_i``.
"""

import torch

from .base import Operator, consecutive_slices, stack_rows


class Augment(Operator):
    r"""Column concatenation :math:`[\mathbf{A}_1, \dots, \mathbf{A}_k]` (``n x sum c_i``).

    Two or more operands with the same number of rows, e.g. the random-effect design
    matrices of two factors, ``Z = [Z_1, Z_2]``, to propagate a joint covariance through.

    Example::

        >>> import torch
        >>> from covmodules import Augment
        >>> Z = Augment(intercept=torch.ones(3, 1), slope=torch.tensor([[0.0], [1.0], [2.0]]))
        >>> Z()
        tensor([[1., 0.],
                [1., 1.],
                [1., 2.]])
    """

    min_operands = 2

    @property
    def shape(self):
        shapes = [op.shape for op in self.operand_modules]
        return (shapes[0][0], sum(s[1] for s in shapes))

    def _check_shapes(self, shapes):
        if len({s[0] for s in shapes}) != 1:
            raise ValueError(f"Augment operands must have equal row counts, got shapes "
                             f"{dict(zip(self._operand_names, shapes))}")

    def _cols(self):
        return consecutive_slices([op.shape[1] for op in self.operand_modules])

    def _evaluate(self, nat):
        return torch.cat(self._operand_values(nat), dim=1)

    def _vjp(self, nat, G):
        return torch.cat([op._vjp(part, G[:, c])
                          for op, part, c in zip(self.operand_modules, self._split(nat),
                                                 self._cols())])

    def _dv_matmul(self, nat, W, transpose=False):
        parts, cols = self._split(nat), self._cols()
        if not transpose:
            return torch.cat([op._dv_matmul(part, W[c])
                              for op, part, c in zip(self.operand_modules, parts, cols)])
        blocks = [op._dv_matmul(part, W, True) for op, part in zip(self.operand_modules, parts)]
        return stack_rows(blocks, cols, self.shape[1])
