"""Capability views: what a solver needs to know of a module's structure, without its class.

A module offers a view through :meth:`CovarianceModule.diagonal_view` or
:meth:`CovarianceModule.repeated_block_view` (``None``: it does not have that structure);
solvers read only these, so a new structure that offers a view needs no edit of any solver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["DiagonalView", "RepeatedBlock"]


@dataclass(frozen=True)
class DiagonalView:
    """A diagonal matrix ``diag(values(nat))``.

    Args:
        values: natural-scale parameters (all, flat order) → the ``(n,)`` diagonal.
        vjp: ``(nat, d)`` → ``[Σ_i d_i ∂V_ii/∂θ_k]_k`` over all parameters, for a cotangent
            whose diagonal is ``d``.
        constant: the diagonal is one value repeated (``σ² I`` or ``I``).
    """

    values: Callable[[torch.Tensor], torch.Tensor]
    vjp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    constant: bool = False


@dataclass(frozen=True)
class RepeatedBlock:
    """``I_count ⊗ block``: ``block`` is a covariance module whose flat parameters are those of
    the module offering the view (so ``block._evaluate(nat)`` is one diagonal block)."""

    count: int
    block: object
