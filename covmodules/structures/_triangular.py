r"""Index helpers and derivatives for structures built on a lower-trapezoidal factor ``F``.

For ``V = F Fᵀ`` with ``F`` of shape ``(n, m)`` and free entries ``F_ab`` (``a >= b``):

.. math:: \frac{\partial \mathbf{V}}{\partial F_{ab}} = \mathbf{e}_a \mathbf{f}_b^\top
          + \mathbf{f}_b \mathbf{e}_a^\top,
          \qquad \Big\langle \mathbf{G}, \frac{\partial \mathbf{V}}{\partial F_{ab}} \Big\rangle
          = \big[(\mathbf{G} + \mathbf{G}^\top) \mathbf{F}\big]_{ab},

where ``f_b`` is column ``b`` of ``F``. Entries are ordered column-major (lme4's theta order).
"""

import torch


def tril_index(n: int, m: int, row_major: bool = False) -> tuple[list[int], list[int]]:
    """Rows and columns of the entries ``i >= j``, ``j < m`` of ``n x m``, column-major (or
    row-major)."""
    pairs = [(i, j) for j in range(m) for i in range(j, n)]
    if row_major:
        pairs.sort()
    return [i for i, _ in pairs], [j for _, j in pairs]


def index_tensors(rows, cols, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(cols, dtype=torch.long, device=device))


def fill(values: torch.Tensor, rows, cols, shape) -> torch.Tensor:
    """The matrix of ``shape`` with ``values`` at ``(rows, cols)`` and zeros elsewhere."""
    return values.new_zeros(shape).index_put((rows, cols), values)


def outer_jacobian(F: torch.Tensor, rows, cols) -> torch.Tensor:
    """``(K, n, n)`` derivatives of ``F Fᵀ`` with respect to the entries ``F[rows, cols]``."""
    A = F.new_zeros(len(rows), F.shape[0], F.shape[0])
    A[torch.arange(len(rows), device=F.device), rows] = F[:, cols].T
    return A + A.transpose(1, 2)


def outer_vjp(F: torch.Tensor, G: torch.Tensor, rows, cols) -> torch.Tensor:
    """``[<G, d(F Fᵀ)/dF_ab>]`` over the entries ``(rows, cols)``."""
    return ((G + G.T) @ F)[rows, cols]


def outer_dv_matmul(F: torch.Tensor, W: torch.Tensor, rows, cols) -> torch.Tensor:
    """``[d(F Fᵀ)/dF_ab @ W]``, shape ``(K, n, r)``; the derivatives are symmetric."""
    out = W.new_zeros(len(rows), F.shape[0], W.shape[1])
    out[torch.arange(len(rows), device=W.device), rows] = (F.T @ W)[cols]
    return out + F[:, cols].T[:, :, None] * W[rows][:, None, :]
