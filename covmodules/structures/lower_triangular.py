r"""A free lower-trapezoidal matrix (e.g. a loading or Cholesky factor used as an operand).

.. math:: \mathbf{V} = \mathbf{L} \in \mathbb{R}^{n \times m}, \quad L_{ij} = 0 \ (i < j),
          \qquad \frac{\partial \mathbf{V}}{\partial L_{ab}} = \mathbf{E}_{ab},

so the vector-Jacobian product picks ``G[a, b]`` and ``dV/dL_ab @ W`` is row ``b`` of ``W``
placed in row ``a``.
"""

import torch

from ..base import Structure
from ..transforms import Identity
from ..validation import check_size
from ._triangular import fill, index_tensors, tril_index


class LowerTriangularMatrix(Structure):
    r"""An ``n x m`` lower-trapezoidal matrix ``L`` (``m = n`` by default).

    Parameters ``L[i,j]`` (``i >= j``; alias ``L_i_j``), identity transform. By default
    (``order="row"``, torch-openreml's layout) they run row-major (``(0,0), (1,0), (1,1),
    (2,0), ...``), every default ``1``, any ``m``; ``order="col"`` (``m <= n``) runs them
    column-major (lme4's theta order) with defaults ``1`` on the diagonal and ``0`` below it.

    Example::

        >>> import torch
        >>> from covmodules import LowerTriangularMatrix
        >>> L = LowerTriangularMatrix(3, 2)
        >>> L.param_names
        ['L[0,0]', 'L[1,0]', 'L[1,1]', 'L[2,0]', 'L[2,1]']
        >>> L(torch.arange(1.0, 6.0)).detach()
        tensor([[1., 0.],
                [2., 3.],
                [4., 5.]])
        >>> C = LowerTriangularMatrix(3, 2, order="col")
        >>> C.param_names
        ['L[0,0]', 'L[1,0]', 'L[2,0]', 'L[1,1]', 'L[2,1]']
        >>> C().detach()
        tensor([[1., 0.],
                [0., 1.],
                [0., 0.]], dtype=torch.float64)
    """

    def __init__(self, n: int, m: int | None = None, *, order: str = "row"):
        super().__init__()
        if order not in ("row", "col"):
            raise ValueError(f"order must be 'row' or 'col', got {order!r}")
        self.n = check_size(n, "n")
        self.m = self.n if m is None else check_size(m, "m")
        self.order = order
        if self.m > self.n and order == "col":
            raise ValueError(f"m must be <= n = {self.n}, got {self.m}")
        self._rows, self._cols = tril_index(self.n, self.m, row_major=order == "row")
        for i, j in zip(self._rows, self._cols):
            default = 1.0 if i == j or order == "row" else 0.0
            self.add_param(f"L[{i},{j}]", default, Identity(), "loading", alias=f"L_{i}_{j}")

    @property
    def shape(self):
        return (self.n, self.m)

    def _evaluate(self, nat):
        rows, cols = index_tensors(self._rows, self._cols, nat.device)
        return fill(nat, rows, cols, self.shape)

    def _jacobian(self, nat):
        rows, cols = index_tensors(self._rows, self._cols, nat.device)
        J = nat.new_zeros(self.num_params, *self.shape)
        J[torch.arange(self.num_params, device=nat.device), rows, cols] = 1
        return J

    def _vjp(self, nat, G):
        rows, cols = index_tensors(self._rows, self._cols, G.device)
        return G[rows, cols]

    def _dv_matmul(self, nat, W, transpose=False):
        rows, cols = index_tensors(self._rows, self._cols, W.device)
        if transpose:
            rows, cols = cols, rows
        out = W.new_zeros(self.num_params, self.shape[1] if transpose else self.n, W.shape[1])
        out[torch.arange(self.num_params, device=W.device), rows] = W[cols]
        return out
