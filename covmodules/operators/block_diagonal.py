r"""Block-diagonal matrix of covariance matrices.

:math:`\mathbf{V} = \operatorname{diag}(\mathbf{V}_1, \dots, \mathbf{V}_k)`, blocks of any
shape (``r_i x c_i``) placed along the diagonal. Block ``i`` occupies rows ``R_i`` and
columns ``C_i``; its cotangent is ``G[R_i, C_i]`` and ``dV/dθ @ W`` is ``dV_i/dθ @ W[C_i]`` on
rows ``R_i`` (zero elsewhere).
"""

import torch

from ..capabilities import BlockDiagonalView
from .base import Operator, consecutive_slices, stack_rows


class BlockDiagonal(Operator):
    r"""Block diagonal :math:`\mathbf{V} = \operatorname{diag}(\mathbf{V}_1, \dots, \mathbf{V}_k)`.

    Two or more operands (modules or fixed tensors), any shapes; rectangular blocks are
    allowed. Typical use: independent groups (``diag(V_a, V_b)``) or separate variance
    components per treatment.

    Example::

        >>> import torch
        >>> from covmodules import AR1Matrix, BlockDiagonal, ScalarMatrix
        >>> V = BlockDiagonal(early=AR1Matrix(2), late=ScalarMatrix(1))
        >>> V(torch.tensor([0.0, 1.0, 0.5]))
        tensor([[1.0000, 0.4621, 0.0000],
                [0.4621, 1.0000, 0.0000],
                [0.0000, 0.0000, 2.7183]])
        >>> V.free_param_names
        ['early/sigma^2', 'early/rho', 'late/sigma^2']
    """

    min_operands = 2

    @property
    def shape(self):
        shapes = [op.shape for op in self.operand_modules]
        return (sum(s[0] for s in shapes), sum(s[1] for s in shapes))

    def _slices(self):
        shapes = [op.shape for op in self.operand_modules]
        return (consecutive_slices([s[0] for s in shapes]),
                consecutive_slices([s[1] for s in shapes]))

    def _evaluate(self, nat):
        return torch.block_diag(*self._operand_values(nat))

    def _vjp(self, nat, G):
        rows, cols = self._slices()
        return torch.cat([op._vjp(part, G[r, c])
                          for op, part, r, c in zip(self.operand_modules, self._split(nat),
                                                    rows, cols)])

    def _dv_matmul(self, nat, W, transpose=False):
        rows, cols = self._slices()
        if transpose:
            rows, cols = cols, rows
        blocks = [op._dv_matmul(part, W[c], transpose)
                  for op, part, c in zip(self.operand_modules, self._split(nat), cols)]
        return stack_rows(blocks, rows, self.shape[1] if transpose else self.shape[0])

    def block_diagonal_view(self):
        """The blocks, when every block is square."""
        rows, cols = self._slices()
        if rows != cols:
            return None
        params = consecutive_slices(self._operand_sizes)
        return BlockDiagonalView(tuple(zip(self.operand_modules, rows, params)))
