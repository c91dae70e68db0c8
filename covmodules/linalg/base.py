"""The solver interface: how the REML objective factorises ``V`` for one kind of structure.

A solver evaluates, for free parameters ``θ``, the loss ``-l`` (differentiable), a state with
``neg_loglik``, ``beta`` (GLS), ``cov_beta``, ``Py`` and ``project(U) = Uᵀ P U``, and the
gradient of ``-l`` over the free parameters. The average-information matrix follows from the
state and the module's structured ``dV`` products, the same for every solver.
"""

from __future__ import annotations

import abc

import torch

__all__ = ["NotPositiveDefiniteError", "Solver"]


class NotPositiveDefiniteError(ValueError):
    """``V`` (or ``XᵀV⁻¹X``) is not positive definite at the given parameters."""


class Solver(abc.ABC):
    """Base class of the likelihood solvers (dense, Kronecker, grouped, Woodbury)."""

    name: str

    def __init__(self, model):
        self.model = model

    @classmethod
    @abc.abstractmethod
    def supports(cls, model) -> bool:
        """Whether this solver applies to ``model``'s structure."""

    @abc.abstractmethod
    def loss(self, free_params, y, X, method) -> torch.Tensor:
        """``-l`` at ``free_params`` (registered parameters if ``None``), differentiable."""

    @abc.abstractmethod
    def state(self, free, y, X, method):
        """Factorisation and estimates at free parameters ``free`` (no autograd)."""

    @abc.abstractmethod
    def gradient(self, free, state) -> torch.Tensor:
        """``∂(-l)/∂θ`` over the free parameters."""

    def average_information(self, free, state) -> torch.Tensor:
        """``AI = ½ Uᵀ P U`` with ``U[:, k] = dV/dθ_k (P y)``: K structured products."""
        U = self.model.dV(state.Py, free)
        return 0.5 * state.project(U.T)
