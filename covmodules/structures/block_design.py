r"""Design matrix with one block of ``k`` columns per level: random intercepts and slopes.

.. math:: Z_{i,\, c_i k + a} = v_{ia}, \quad a < k, \qquad Z \in \mathbb{R}^{n \times Lk},

zero elsewhere: row ``i`` belongs to level ``c_i`` and carries its ``k`` term values ``v_i``
(``1`` for an intercept, the covariate for a slope). Only ``c`` and ``v`` are stored, so
``Z W`` and ``Zᵀ W`` cost ``O(n k r)`` and no ``n x Lk`` matrix is formed outside
:meth:`_evaluate`. It has no parameters.
"""

import torch

from ..base import Structure
from ..validation import check_size

__all__ = ["BlockDesignMatrix", "block_matmul", "block_rmatmul", "block_pattern"]


def block_matmul(codes, values, num_levels: int, W: torch.Tensor) -> torch.Tensor:
    """``Z W`` for ``W`` of shape ``(L k, r)``: ``k`` row gathers, no ``(n, k, r)`` temporary."""
    k = values.shape[1]
    W3, values = W.reshape(num_levels, k, -1), values.to(W.dtype)
    out = values[:, :1] * W3[codes, 0]
    for a in range(1, k):
        out += values[:, a:a + 1] * W3[codes, a]
    return out


def block_rmatmul(codes, values, num_levels: int, W: torch.Tensor) -> torch.Tensor:
    """``Zᵀ W`` for ``W`` of shape ``(n, r)``: one row scatter-add of the ``k r`` products."""
    (n, k), r, values = values.shape, W.shape[1], values.to(W.dtype)
    products = (values[:, :, None] * W[:, None, :]).reshape(n, k * r) if k > 1 else values * W
    return W.new_zeros(num_levels, k * r).index_add_(0, codes, products).reshape(-1, r)


def block_pattern(Z: torch.Tensor, k: int):
    """``(level, values)`` when every row of a dense ``Z`` (``n x L k``) is zero outside one
    block of ``k`` columns (``level = -1`` and zero values for a row of zeros), else ``None``.
    Two passes over ``Z`` (a product that locates the blocks, a count that checks them; its
    ``nonzero`` where that check fails or ``Z`` is not floating); no temporary of ``Z``'s size.

    >>> block_pattern(torch.tensor([[0.0, 0.0, 1.0, 2.0], [3.0, 4.0, 0.0, 0.0]]), 2)
    (tensor([1, 0]), tensor([[1., 2.],
            [3., 4.]]))
    """
    n, q = Z.shape
    if q % k:
        return None
    found = _located(Z, k) if Z.is_floating_point() else None
    return found if found is not None else _pattern(Z, k)


def _located(Z: torch.Tensor, k: int):
    """:func:`block_pattern` from one product ``Z W`` (two passes over ``Z`` in all, where
    ``nonzero`` costs about three), or ``None`` when its check fails.

    With one block per row, ``(Z W)_{ia} = v_{ia}`` (the row's value at offset ``a``) and
    ``(Z W)_{i,k+a} = b_i v_{ia}`` exactly (one nonzero product per sum), which locates the
    block ``b_i``. The check is exact whatever ``Z`` is: the entries read at the located
    columns are all the entries of ``Z`` (their counts agree) only when no row has one outside
    its block."""
    n, q = Z.shape
    bits = _bits(Z)
    column = torch.arange(q, device=Z.device)
    W = Z.new_zeros(q, 2 * k)
    W[column, column % k] = 1.0
    W[column, k + column % k] = (column // k).to(Z.dtype)
    R = Z @ W
    s, t = R[:, :k], R[:, k:]
    first = (s != 0).to(torch.uint8).argmax(1, keepdim=True)      # an offset with a value
    v = s.gather(1, first)[:, 0]
    if not bool(torch.isfinite(R).all()):
        return None
    empty = v == 0
    level = torch.where(empty, 0.0, t.gather(1, first)[:, 0] / torch.where(empty, 1.0, v))
    level = level.round().clamp(0, q // k - 1).long()
    columns = level[:, None] * k + torch.arange(k, device=Z.device)
    values = Z.gather(1, columns)
    inside = torch.count_nonzero(bits.gather(1, columns))
    if int(inside) != int(torch.count_nonzero(bits)):
        return None
    empty = (values == 0).all(1)                       # a -0.0 is no entry either
    return torch.where(empty, -1, level), values * (~empty)[:, None]


def _bits(Z: torch.Tensor) -> torch.Tensor:
    """A contiguous float ``Z`` seen as integers of its width, whose count of nonzeros is
    faster (the entries it counts are those of ``Z`` and its ``-0.0``)."""
    widths = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    if Z.is_floating_point() and Z.is_contiguous() and Z.element_size() in widths:
        return Z.view(widths[Z.element_size()])
    return Z


def _pattern(Z: torch.Tensor, k: int):
    """:func:`block_pattern` from ``Z``'s nonzeros (``NaN`` and ``inf`` among them)."""
    n, q = Z.shape
    rows, cols = Z.nonzero(as_tuple=True)
    blocks = cols // k
    first = torch.full((n,), q, dtype=blocks.dtype, device=Z.device).scatter_reduce(
        0, rows, blocks, "amin")
    last = torch.full((n,), -1, dtype=blocks.dtype, device=Z.device).scatter_reduce(
        0, rows, blocks, "amax")
    empty = last < 0
    if bool((~empty & (first != last)).any()):
        return None
    columns = last.clamp(min=0)[:, None] * k + torch.arange(k, device=Z.device)
    values = Z.gather(1, columns)
    empty = (values == 0).all(1)                       # a -0.0 is no entry either
    return torch.where(empty, -1, last), values * (~empty)[:, None]


class BlockDesignMatrix(Structure):
    """``Z`` from level codes ``c`` (``n``) and term values ``v`` (``n x k``), ``L`` levels.

    Example (random intercept and slope for 2 subjects)::

        >>> import torch
        >>> from covmodules import BlockDesignMatrix
        >>> Z = BlockDesignMatrix(torch.tensor([0, 0, 1]),
        ...                       torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]), 2)
        >>> Z()
        tensor([[1., 0., 0., 0.],
                [1., 1., 0., 0.],
                [0., 0., 1., 0.]], dtype=torch.float64)
    """

    def __init__(self, codes, values, num_levels: int):
        super().__init__()
        self.num_levels = check_size(num_levels, "num_levels")
        codes = torch.as_tensor(codes)
        values = torch.as_tensor(values)
        if codes.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.dim() != 1:
            raise ValueError(f"codes must be 1-D, got shape {tuple(codes.shape)}")
        if values.dim() == 1:
            values = values[:, None]
        if values.dim() != 2 or values.shape[0] != codes.shape[0]:
            raise ValueError(f"values must have shape ({codes.shape[0]}, k), "
                             f"got {tuple(values.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_levels):
            raise ValueError(f"codes must lie in [0, {self.num_levels - 1}]")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("values contains NaN or inf")
        self.register_buffer("codes", codes.long())
        self.register_buffer("values", values.to(torch.float64))

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def shape(self):
        return (self.codes.shape[0], self.num_levels * self.k)

    def product(self, W: torch.Tensor) -> torch.Tensor:
        """``Z W`` for ``W`` of shape ``(L k, r)``, differentiable in ``W``."""
        return block_matmul(self.codes, self.values, self.num_levels, W)

    def transposed_product(self, W: torch.Tensor) -> torch.Tensor:
        """``Zᵀ W`` for ``W`` of shape ``(n, r)``, differentiable in ``W``."""
        return block_rmatmul(self.codes, self.values, self.num_levels, W)

    def _matmul(self, nat, W):
        return self.product(W)

    def _evaluate(self, nat):
        return self.product(torch.eye(self.shape[1], dtype=nat.dtype, device=self.codes.device))

    def _jacobian(self, nat):
        return nat.new_zeros(0, *self.shape)

    def _dv_matmul(self, nat, W, transpose=False):
        return W.new_zeros(0, self.shape[1] if transpose else self.shape[0], W.shape[1])

    def extra_repr(self):
        return f"shape={self.shape}, levels={self.num_levels}, k={self.k}"
