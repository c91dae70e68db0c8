r"""The solver interface: how the REML objective factorises ``V`` for one kind of structure.

A solver evaluates, for free parameters ``θ``, the loss ``-l`` (differentiable), a state with
``neg_loglik``, ``beta`` (GLS), ``cov_beta``, ``Py`` and ``project(U) = Uᵀ P U``, and the
gradient of ``-l`` over the free parameters. The average-information matrix follows from the
state and the module's structured ``dV`` products, the same for every solver.

Every solver, the dense one included, shares the generalised least squares algebra through a
:class:`Factor`: ``log|V|`` and a linear "whitening" map ``F`` with an inner product
``⟨u, w⟩ = uᵀ J w`` (``J`` a fixed ±1 signature, the identity except for Woodbury) such that

.. math:: B^T V^{-1} C = \langle F B, F C \rangle, \qquad V^{-1} B = F^T J (F B).

With ``X_w = F X``, ``y_w = F y``: the statistics ``A = ⟨X_w, X_w⟩ = XᵀV⁻¹X``,
``b = ⟨X_w, y_w⟩``, ``c = ⟨y_w, y_w⟩`` and ``log|V|`` (:mod:`.statistics`, where they are
finished into ``b̂`` and ``-l``), ``r_w = y_w - X_w b̂``, ``P y = Fᵀ J r_w`` and
``Uᵀ P U = ⟨F U, F U⟩ - ⟨X_w, F U⟩ᵀ A⁻¹ ⟨X_w, F U⟩`` (:func:`gls`). A solver supplies the
factor and the contraction of the cotangent ``∂(-l)/∂V = ½(P - Py (Py)ᵀ)`` with its structure
(``V⁻¹`` in place of ``P`` for ML), so no structured solver forms an ``N x N`` matrix.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .statistics import GLSStatistics, NotPositiveDefiniteError

__all__ = ["NotPositiveDefiniteError", "UnsupportedStructure", "Solver", "Factor", "GLSState",
           "gls", "NegLogLik", "additive_pieces", "mixed_model_pieces", "term_dv"]


class UnsupportedStructure(ValueError):
    """A solver does not apply to the model's structure (the message says why)."""


class Factor(abc.ABC):
    """``log|V|`` and a whitening map ``F`` with ``Fᵀ J F = V⁻¹`` (see the module docstring)."""

    logdet: torch.Tensor

    @abc.abstractmethod
    def whiten(self, B: torch.Tensor) -> torch.Tensor:
        """``F B`` for ``B`` of shape ``(n, k)``."""

    @abc.abstractmethod
    def unwhiten(self, W: torch.Tensor) -> torch.Tensor:
        """``Fᵀ J W``: ``V⁻¹ B`` for ``W = F B``."""

    def inner(self, U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``Uᵀ J W``."""
        return U.T @ W


@dataclass
class GLSState:
    """Factorisation and estimates at one parameter value (structured paths)."""

    factor: Factor
    Xw: torch.Tensor         # F X
    LA: torch.Tensor         # Cholesky factor of A = XᵀV⁻¹X
    beta: torch.Tensor       # GLS estimate
    rw: torch.Tensor         # F (y - X b̂)
    py: torch.Tensor | None  # P y, or None until :attr:`Py` is first read
    neg_loglik: torch.Tensor
    method: str

    @property
    def Py(self) -> torch.Tensor:
        """``V⁻¹(y - X b̂) = P y`` (``Fᵀ J r_w``, computed on first use: trial points of a
        line search need only ``-l``)."""
        if self.py is None:
            self.py = self.factor.unwhiten(self.rw[:, None])[:, 0]
        return self.py

    def project(self, U: torch.Tensor) -> torch.Tensor:
        """``Uᵀ P U`` for ``U`` of shape ``(n, k)`` (``Uᵀ V⁻¹ U`` for ML)."""
        return self.project_whitened(self.factor.whiten(U))

    def project_whitened(self, Uw: torch.Tensor) -> torch.Tensor:
        """``Uᵀ P U`` from ``Uw = F U``."""
        out = self.factor.inner(Uw, Uw)
        if self.method == "reml":
            C = torch.linalg.solve_triangular(self.LA, self.factor.inner(self.Xw, Uw),
                                              upper=False)
            out = out - C.T @ C
        return out

    @property
    def cov_beta(self) -> torch.Tensor:
        """``(XᵀV⁻¹X)⁻¹``."""
        return torch.cholesky_inverse(self.LA)

    def solve_x(self) -> torch.Tensor:
        """``V⁻¹ X``."""
        return self.factor.unwhiten(self.Xw)

    def low_rank_x(self) -> torch.Tensor:
        """``F X L_A⁻ᵀ``: the whitened ``W`` with ``W Wᵀ`` the REML term ``F X A⁻¹ Xᵀ Fᵀ``."""
        return torch.linalg.solve_triangular(self.LA, self.Xw.T, upper=False).T


def gls(factor: Factor, y: torch.Tensor, X: torch.Tensor, method: str,
        n: int | None = None) -> GLSState:
    """GLS estimate and ``-l`` (R's scale) from a factorisation of ``V``: the statistics of
    :mod:`~covmodules.linalg.statistics`, finished with the residuals' own quadratic form
    (``n``: the observations, when ``y`` holds other coordinates than one per row)."""
    Xw, yw = factor.whiten(X), factor.whiten(y[:, None])[:, 0]
    residual = {}

    def quadratic(beta):
        residual["rw"] = rw = yw - Xw @ beta
        return factor.inner(rw[:, None], rw[:, None])[0, 0]

    est = GLSStatistics.of_whitened(factor, Xw, yw, y.shape[0] if n is None else n
                                    ).finish(method, quadratic)
    return GLSState(factor, Xw, est.LA, est.beta, residual["rw"], None, est.neg_loglik, method)


def data_cotangents(state, grad, need_y: bool, need_X: bool):
    """Cotangents of ``y`` and ``X`` in ``-l``: ``P y`` and ``-P y b̂ᵀ + V⁻¹X (XᵀV⁻¹X)⁻¹``
    (REML; ML without the second term), times ``grad``; ``None`` where not needed."""
    gy = grad * state.Py if need_y else None
    gX = None
    if need_X:
        gX = -torch.outer(state.Py, state.beta)
        if state.method == "reml":
            gX += state.solve_x() @ state.cov_beta
        gX *= grad
    return gy, gX


class NegLogLik(torch.autograd.Function):
    """``-l`` from a state computed without autograd, with a closed-form backward.

    ``apply(free, y, X, state_fn, gradient_fn)``: the forward pass is ``state_fn(free)``'s
    ``neg_loglik``; the backward pass gives ``θ`` the cotangent ``gradient_fn(free, state)``
    (a solver's :meth:`~Solver.gradient`; for sharded data, this process's share)
    and ``y``, ``X`` theirs, ``P y`` and ``-P y b̂ᵀ + V⁻¹X (XᵀV⁻¹X)⁻¹`` (REML; ML without the
    second term), when they require gradients.
    """

    @staticmethod
    def forward(ctx, free, y, X, state_fn, gradient_fn):
        state = state_fn(free.detach())
        ctx.state, ctx.gradient_fn = state, gradient_fn
        ctx.save_for_backward(free)
        return state.neg_loglik.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (free,) = ctx.saved_tensors
        g_free = None
        if ctx.needs_input_grad[0]:
            g_free = (ctx.gradient_fn(free.detach(), ctx.state) * grad).to(free.dtype)
        gy, gX = data_cotangents(ctx.state, grad, *ctx.needs_input_grad[1:3])
        return g_free, gy, gX, None, None


class Solver(abc.ABC):
    """A likelihood solver: a :class:`Factor` of ``V`` and the closed-form contraction of the
    cotangent with the model (dense, Kronecker, grouped, Woodbury).

    Subclasses implement :meth:`factorize` (``Factor`` at natural parameters) and
    :meth:`natural_gradient` (``[⟨½(P - Py Pyᵀ), ∂V/∂θ_k⟩]_k`` over all parameters), and
    raise :class:`UnsupportedStructure` on construction when the model lacks their structure.
    """

    name: str
    #: whether automatic dispatch considers it (else only ``solver="name"`` builds it)
    automatic: bool = True

    def __init__(self, model):
        self.model = model

    @abc.abstractmethod
    def factorize(self, nat: torch.Tensor) -> Factor:
        """The factorisation of ``V`` at natural-scale parameters ``nat`` (all, flat order)."""

    @abc.abstractmethod
    def natural_gradient(self, nat: torch.Tensor, state: GLSState) -> torch.Tensor:
        """``∂(-l)/∂θ`` over all parameters on the natural scale."""

    @property
    def cost(self) -> float:
        """Flop estimate of one factorisation (dispatch picks the cheapest solver)."""
        n = self.model.shape[0]
        return n ** 3 / 3

    def loss(self, free_params, y, X, method) -> torch.Tensor:
        """``-l`` at ``free_params`` (registered parameters if ``None``), differentiable."""
        free = self.model._differentiable_free(free_params)
        y, X = y.to(free.dtype), X.to(free.dtype)
        return NegLogLik.apply(free, y, X, lambda f: self.state(f, y, X, method), self.gradient)

    def state(self, free, y, X, method) -> GLSState:
        """Factorisation and estimates at free parameters ``free`` (no autograd)."""
        with torch.no_grad():
            nat = self.model.build_params(free)
            return gls(self.factorize(nat), y.to(nat.dtype), X.to(nat.dtype), method)

    def gradient(self, free, state: GLSState) -> torch.Tensor:
        """``∂(-l)/∂θ`` over the free parameters: one closed-form backward pass."""
        with torch.no_grad():
            free = None if free is None else free.detach()
            g = self.natural_gradient(self.model.build_params(free), state)
            return self.model.to_free(g, free)

    def average_information(self, free, state) -> torch.Tensor:
        """``AI = ½ Uᵀ P U`` with ``U[:, k] = dV/dθ_k (P y)``: K structured products (the
        solver's :meth:`natural_dv_py` where it has cheaper ones than the model's ``dV``)."""
        with torch.no_grad():
            U = self.natural_dv_py(self.model.build_params(free), state.Py)
        U = self.model.dV(state.Py, free) if U is None else self.model.to_free(U, free)
        return 0.5 * state.project(U.T)

    def columns(self, B: torch.Tensor) -> torch.Tensor:
        """The fitted data's columns ``B`` (``y``, ``X``) as :meth:`Factor.whiten` takes them:
        themselves, for the solvers that work on rows."""
        return B

    def term_columns(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """``Z_t W`` of random term ``name`` of a :class:`~covmodules.MixedModel`, as
        :meth:`columns`."""
        return self.model.z_matmul(name, W)

    def natural_dv_py(self, nat: torch.Tensor, Py: torch.Tensor):
        """``[∂V/∂θ_k P y]_k`` over all parameters on the natural scale, ``(K, n)``, or
        ``None`` for the model's own ``dV``."""
        return None


def mixed_model_pieces(model) -> list[tuple[str | None, object, int]]:
    """:func:`additive_pieces` of a :class:`~covmodules.model.MixedModel` with random terms;
    :class:`UnsupportedStructure` for any other model (the solvers built on the mixed-model
    equations)."""
    from ..model import MixedModel
    if not isinstance(model, MixedModel) or not model.term_names:
        raise UnsupportedStructure("needs a MixedModel with random terms")
    return additive_pieces(model)


def additive_pieces(model) -> list[tuple[str | None, object, int]]:
    """``V`` as a flat sum: ``[(term name or None, module, offset in the flat parameters)]``.

    A :class:`~covmodules.model.MixedModel` gives one piece per random term (name, ``G``) and
    the pieces of its residual; a :class:`~covmodules.operators.sum.Sum` the pieces of its
    operands; anything else is one piece.
    """
    from ..model import MixedModel
    from ..operators.sum import Sum

    def leaves(module, offset):
        if isinstance(module, Sum):
            out = []
            for op in module.operand_modules:
                out += leaves(op, offset)
                offset += op.num_params
            return out
        return [(None, module, offset)]

    if isinstance(model, MixedModel):
        out, offset = [], 0
        for name in model.term_names:
            G = model._modules[name]
            out.append((name, G, offset))
            offset += G.num_params
        return out + leaves(model._modules["residual"], offset)
    return leaves(model, 0)


def term_dv(block, part, codes, values, num_levels: int, Py: torch.Tensor) -> torch.Tensor:
    """``[Z (I ⊗ ∂S/∂θ_k) Zᵀ P y]_k`` (``K x n``) of a random term ``Z (I ⊗ S) Zᵀ`` whose ``Z``
    has one block of columns per level (``codes``, ``values``): through the level sums
    ``Z̃ᵀ P y`` (``L x k``), without ``Z``."""
    values = values.to(Py.dtype)
    sums = Py.new_zeros(num_levels, values.shape[1]).index_add_(0, codes, values * Py[:, None])
    dS = block._dv_matmul(part, sums.T)                                  # (K, k, L)
    return torch.einsum("ik,Kki->Ki", values, dS[:, :, codes])
