r"""Unstructured covariance (ASReml ``us``) through its Cholesky factor.

.. math:: \mathbf{V} = \mathbf{L}\mathbf{L}^\top, \qquad
          \frac{\partial \mathbf{V}}{\partial L_{ab}} = \mathbf{E}_{ab}\mathbf{L}^\top
          + \mathbf{L}\mathbf{E}_{ba}, \qquad
          \Big\langle \mathbf{G}, \frac{\partial \mathbf{V}}{\partial L_{ab}} \Big\rangle
          = \big[(\mathbf{G} + \mathbf{G}^\top)\mathbf{L}\big]_{ab},

``L`` lower triangular with a positive diagonal ``L_ii = exp(x_ii)``, so every real parameter
vector gives a positive definite ``V`` and every positive definite ``V`` has exactly one
parameter vector. Parameters run column-major over the lower triangle (lme4's ``theta``
order): ``L[0,0], L[1,0], ..., L[n-1,0], L[1,1], ...``.
"""

import torch

from ..base import Structure
from ..natural import covariance_summary
from ..transforms import Exp, Identity
from ..validation import as_matrix, check_size
from ._triangular import (fill, index_tensors, outer_dv_matmul, outer_jacobian, outer_vjp,
                          tril_index)


class UnconstrainedMatrix(Structure):
    r"""Unstructured positive definite covariance :math:`\mathbf{L}\mathbf{L}^\top`.

    Parameters ``L[i,j]`` (``i >= j``): ``exp`` transform on the diagonal, identity off it;
    defaults ``0`` (``V = I``). :meth:`covariance` and :meth:`set_covariance` read and set
    ``V`` itself.

    Example::

        >>> import torch
        >>> from covmodules import UnconstrainedMatrix
        >>> G = UnconstrainedMatrix(2)
        >>> G.param_names
        ['L[0,0]', 'L[1,0]', 'L[1,1]']
        >>> G.set_covariance(torch.tensor([[4.0, 2.0], [2.0, 5.0]]))
        >>> G.params
        {'L[0,0]': 2.0, 'L[1,0]': 1.0, 'L[1,1]': 2.0}
        >>> G.covariance()
        tensor([[4., 2.],
                [2., 5.]], dtype=torch.float64)
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = check_size(n, "n")
        self._rows, self._cols = tril_index(self.n, self.n)
        for i, j in zip(self._rows, self._cols):
            self.add_param(f"L[{i},{j}]", 0.0, Exp() if i == j else Identity(),
                           "sd" if i == j else "loading")

    @property
    def shape(self):
        return (self.n, self.n)

    def sign_reflections(self) -> dict[int, list[int]]:
        """Column ``j`` of ``L`` enters ``V`` as ``l_j l_jᵀ``: ``L[j,j]`` flips with ``L[i,j]``."""
        where = {(i, j): k for k, (i, j) in enumerate(zip(self._rows, self._cols))}
        return {where[j, j]: [where[i, j] for i in range(j + 1, self.n)]
                for j in range(self.n)}

    def _factor(self, nat):
        rows, cols = index_tensors(self._rows, self._cols, nat.device)
        return fill(nat, rows, cols, self.shape), rows, cols

    def _evaluate(self, nat):
        L, _, _ = self._factor(nat)
        return L @ L.T

    def _jacobian(self, nat):
        return outer_jacobian(*self._factor(nat))

    def _vjp(self, nat, G):
        L, rows, cols = self._factor(nat)
        return outer_vjp(L, G, rows, cols)

    def _dv_matmul(self, nat, W, transpose=False):
        L, rows, cols = self._factor(nat)
        return outer_dv_matmul(L, W, rows, cols)

    def natural_scale(self, nat):
        """Variances ``sigma^2[i]``, SDs ``sd[i]`` and correlations ``rho[i,j]`` of ``V``."""
        return covariance_summary(self._evaluate(nat))

    def covariance(self) -> torch.Tensor:
        """``V`` at the registered parameters (natural scale, detached)."""
        with torch.no_grad():
            return self._evaluate(self.build_params())

    def set_covariance(self, matrix) -> None:
        """Set the parameters so that ``V`` equals the positive definite ``matrix``."""
        V = as_matrix(matrix, "matrix", positive_definite=True)
        if tuple(V.shape) != self.shape:
            raise ValueError(f"matrix must have shape {self.shape}, got {tuple(V.shape)}")
        L = torch.linalg.cholesky(V.to(torch.float64))
        for i, j in zip(self._rows, self._cols):
            self.set_param(f"L[{i},{j}]", float(L[i, j]))
