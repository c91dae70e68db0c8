"""Capability views: what a solver needs to know of a module's structure, without its class.

A module offers a view through :meth:`CovarianceModule.diagonal_view`,
:meth:`CovarianceModule.repeated_block_view` or :meth:`CovarianceModule.kronecker_view`
(``None``: it does not have that structure); solvers read only these, so a new structure that
offers a view needs no edit of any solver. Every view works on the natural-scale parameters
``nat`` (all, flat order) of the module that offers it.

Example (a diagonal residual, as the Woodbury and grouped solvers read it)::

    >>> import torch
    >>> from covmodules import ScalarMatrix
    >>> view = ScalarMatrix(3).diagonal_view()
    >>> nat = torch.tensor([2.0], dtype=torch.float64)
    >>> view.constant, view.values(nat).tolist(), view.trace_vjp(nat, torch.tensor(6.0), 3)
    (True, [2.0, 2.0, 2.0], tensor([6.]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["DiagonalView", "RepeatedBlock", "KroneckerView", "BlockDiagonalView",
           "LowRankDiagonalView", "is_identity"]


@dataclass(frozen=True)
class DiagonalView:
    """A diagonal matrix ``diag(values(nat))``.

    Args:
        values: ``nat`` → the ``(n,)`` diagonal.
        vjp: ``(nat, d)`` → ``[Σ_i d_i ∂V_ii/∂θ_k]_k`` over all parameters, for a cotangent
            whose diagonal is ``d``.
        constant: the diagonal is one value repeated, ``V = v(θ) I`` (``σ² I`` or ``I``), so
            ``⟨Ḡ, ∂V/∂θ_k⟩ = v'_k tr Ḡ`` depends on ``Ḡ`` only through its trace.
    """

    values: Callable[[torch.Tensor], torch.Tensor]
    vjp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    constant: bool = False

    def trace_vjp(self, nat: torch.Tensor, trace: torch.Tensor, n: int) -> torch.Tensor:
        """:attr:`vjp` of a constant diagonal from ``tr Ḡ`` alone (``d = tr Ḡ / n``, repeated)."""
        return self.vjp(nat, (trace / n).expand(n))


@dataclass(frozen=True)
class RepeatedBlock:
    """``I_count ⊗ block``: ``block`` is a covariance module whose flat parameters are those of
    the module offering the view (so ``block._evaluate(nat)`` is one diagonal block)."""

    count: int
    block: object


@dataclass(frozen=True)
class KroneckerView:
    r"""``V = A_1 ⊗ ... ⊗ A_d + s I`` with square factors ``A_i`` (``n_i x n_i``, ``d >= 2``
    for a product, ``d = 1`` for a factor on its own); ``s = 0`` without a nugget.

    Args:
        sizes: ``(n_1, ..., n_d)``.
        values: ``nat`` → ``((A_1, ..., A_d), s)``.
        vjp: ``(nat, (Ā_1, ..., Ā_d), t)`` → ``[Σ_i ⟨Ā_i, ∂A_i/∂θ_k⟩ + t ∂s/∂θ_k]_k`` over all
            parameters. For a cotangent ``Ḡ`` of ``V``, ``Ā_i`` is ``Ḡ`` contracted with every
            other factor over its axes (what :class:`~covmodules.KroneckerProduct` hands its
            operands) and ``t = tr Ḡ``.
        jacobian: ``(nat, i)`` → ``(start, J)``, ``J[j] = ∂A_i/∂θ_{start + j}`` (``n_i x n_i``)
            for the parameters ``nat[start:start + len(J)]`` that factor ``i`` depends on (the
            average-information matrix in the eigenbasis).
        eigh: ``(nat, i, A_i)`` → ``(λ, Q)``, the eigendecomposition of factor ``i`` from its
            value ``A_i``: the factor module's own ``_eigh(nat, A_i)`` where it has a cheaper
            one (AR(1): from its tridiagonal inverse), else ``torch.linalg.eigh``.
        nugget: whether ``s`` can be nonzero (a product nested in a larger product must
            have none).
    """

    sizes: tuple[int, ...]
    values: Callable[[torch.Tensor], tuple]
    vjp: Callable[..., torch.Tensor]
    jacobian: Callable[..., tuple]
    eigh: Callable[..., tuple]
    nugget: bool = False


@dataclass(frozen=True)
class BlockDiagonalView:
    """``V = diag(V_1, ..., V_k)`` with square blocks: ``blocks[b] = (module, rows, params)``,
    block ``b``'s covariance module, its row slice of ``V`` and its slice of ``nat``."""

    blocks: tuple


@dataclass(frozen=True)
class LowRankDiagonalView:
    """``V = Λ Λᵀ + diag(ψ)`` (``Λ`` ``n x k``, ``ψ >= 0``): ``values(nat) → (Λ, ψ)``."""

    values: Callable[[torch.Tensor], tuple]


def is_identity(module) -> bool:
    """Whether ``module`` is the identity: no parameters and a constant diagonal of ones."""
    view = module.diagonal_view()
    if module.num_params or view is None or not view.constant:
        return False
    return float(view.values(torch.zeros(0, dtype=torch.float64))[0]) == 1.0
