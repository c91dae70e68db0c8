"""The gradient contract every covariance module keeps, as checks a new structure can run.

A structure's closed-form derivatives (``_jacobian``, ``_vjp``, ``_dv_matmul``) are what the
solvers and the backward pass use; :func:`check_gradients` compares them with automatic
differentiation of ``_evaluate`` at random points, the way the package's own tests check
every structure and operator (as ``gpytorch.test`` ships GPyTorch's):

- ``manual_grad`` equals ``auto_grad`` (names, shape, values), and is finite;
- ``dV(w)`` equals ``J @ w`` for a vector and a matrix ``w``;
- ``_dv_matmul(..., transpose=True)`` equals ``Jᵀ @ W`` and ``_vjp(G)`` equals
  ``[<G, dV/dθ_k>]_k``;
- ``torch.autograd.gradcheck`` passes through the module's forward (its closed-form backward);
- ``_eigh``, where the module has one (its own eigendecomposition as a Kronecker factor), is
  an orthonormal eigendecomposition of its value.

Example: a new structure ``σ² diag(1, 2, ..., n)`` passes; one whose Jacobian is wrong fails::

    >>> import torch
    >>> from covmodules import Structure
    >>> from covmodules.transforms import ExpPow2
    >>> from covmodules.testing import check_gradients
    >>> class Ramp(Structure):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.n = n
    ...         self.add_param("sigma^2", 0.0, ExpPow2())
    ...     shape = property(lambda self: (self.n, self.n))
    ...     def _evaluate(self, nat):
    ...         return nat[0] * torch.diag(torch.arange(1, self.n + 1, dtype=nat.dtype))
    ...     def _jacobian(self, nat):
    ...         return torch.diag(torch.arange(1, self.n + 1, dtype=nat.dtype))[None]
    >>> check_gradients(Ramp(3))
    >>> class Wrong(Ramp):
    ...     def _jacobian(self, nat):
    ...         return 2 * super()._jacobian(nat)
    >>> check_gradients(Wrong(3))    # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: manual_grad differs from auto_grad at point 0: ...
"""

from __future__ import annotations

import torch

from .base import CovarianceModule

__all__ = ["check_gradients", "check_solver", "random_points"]

DTYPE = torch.float64
TOL = 1e-10         # float64 closed form against autograd: rounding only


def random_points(module: CovarianceModule, count: int = 20, seed: int = 0,
                  scale: float = 1.0) -> list[torch.Tensor]:
    """``count`` free-scale parameter vectors of ``module``, standard normal times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(module.num_free_params, generator=g, dtype=DTYPE)
            for _ in range(count)]


def check_gradients(module: CovarianceModule, points=None, gradcheck: bool = True) -> None:
    """Check ``module``'s closed-form derivatives (see the module docstring) at its defaults
    and at ``points`` (default :func:`random_points`); ``gradcheck`` also runs
    ``torch.autograd.gradcheck`` at the first three. Raises ``AssertionError`` naming the
    check and the point that fails."""
    points = random_points(module) if points is None else points
    points = [module.free_param_defaults] + list(points)
    rows, cols = module.shape
    g = torch.Generator().manual_seed(1)
    for i, p in enumerate(points):
        J, names = module.manual_grad(p)
        Ja, names_a = module.auto_grad(p)
        _require(names == names_a == module.free_param_names,
                 f"manual_grad names {names} and auto_grad names {names_a} are not "
                 f"free_param_names {module.free_param_names}")
        _require(J.shape == (module.num_free_params, rows, cols),
                 f"manual_grad has shape {tuple(J.shape)}, expected "
                 f"{(module.num_free_params, rows, cols)}")
        _require(bool(torch.isfinite(J).all()), f"manual_grad is not finite at point {i}")
        nat = module.build_params(p)
        full_J = module._jacobian(nat)
        w = torch.randn(cols, generator=g, dtype=DTYPE)
        W = torch.randn(cols, 3, generator=g, dtype=DTYPE)
        Wt = torch.randn(rows, 2, generator=g, dtype=DTYPE)
        G = torch.randn(rows, cols, generator=g, dtype=DTYPE)
        for what, got, expected in (
                ("manual_grad differs from auto_grad", J, Ja),
                ("dV(w) differs from J @ w", module.dV(w, p), J @ w),
                ("dV(W) differs from J @ W", module.dV(W, p), J @ W),
                ("_dv_matmul(transpose=True) differs from Jᵀ @ W",
                 module._dv_matmul(nat, Wt, transpose=True), full_J.transpose(1, 2) @ Wt),
                ("_vjp differs from the Jacobian's contraction", module._vjp(nat, G),
                 torch.einsum("kij,ij->k", full_J, G))):
            torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL,
                                       msg=lambda m, what=what: f"{what} at point {i}: {m}")
        if hasattr(module, "_eigh"):
            _check_eigh(module, nat, i)
    if gradcheck:
        for p in points[:3]:
            x = p.clone().requires_grad_(True)
            torch.autograd.gradcheck(lambda f: module(f), (x,), eps=1e-6, atol=1e-6)


def check_solver(model, y: torch.Tensor, X: torch.Tensor, name: str, free=None,
                 method: str = "reml", rtol: float = 1e-8) -> None:
    """Check that solver ``name`` gives every REML quantity of the dense reference path at
    ``free`` (default: a fixed random point) to ``rtol`` relative: natural-scale gradient,
    log-likelihood, BLUE and its covariance, ``P y``, gradient, AI matrix, the loss's
    derivatives in the free parameters, ``y`` and ``X`` through autograd, and the BLUPs of a
    :class:`~covmodules.MixedModel`. Raises ``AssertionError`` naming the quantity."""
    from .linalg import SOLVERS, DenseSolver
    from .linalg.dense import cotangent_v
    from .model import MixedModel
    from .reml import REML
    from .results import FitResult

    structured, dense = SOLVERS[name](model), DenseSolver(model)
    if free is None:
        g = torch.Generator().manual_seed(7)
        free = 0.5 * torch.randn(model.num_free_params, generator=g, dtype=DTYPE)
    s, d = structured.state(free, y, X, method), dense.state(free, y, X, method)

    def same(ours, ref, what):
        ours, ref = torch.as_tensor(ours, dtype=DTYPE), torch.as_tensor(ref, dtype=DTYPE)
        err = float((ours - ref).abs().max()) if ref.numel() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 1.0
        _require(err <= rtol * max(scale, 1e-300),
                 f"{what}: relative error {err / scale:.3g} (solver {name!r} against dense)")

    def loss_grads(solver):
        f, yy, XX = (t.clone().requires_grad_(True) for t in (free, y, X))
        loss = solver.loss(f, yy, XX, method)
        return (loss.detach(), *torch.autograd.grad(loss, (f, yy, XX)))

    nat = model.build_params(free)                            # fixed parameters included
    same(structured.natural_gradient(nat, s), model._vjp(nat, cotangent_v(d)),
         "natural-scale gradient")
    same(s.neg_loglik, d.neg_loglik, "log-likelihood")
    same(s.beta, d.beta, "BLUE")
    same(s.cov_beta, d.cov_beta, "cov(BLUE)")
    same(s.Py, d.Py, "P y")
    same(structured.gradient(free, s), dense.gradient(free, d), "gradient")
    same(structured.average_information(free, s), dense.average_information(free, d),
         "AI matrix")
    for a, b, what in zip(loss_grads(structured), loss_grads(dense),
                          ["loss", "d loss/d free", "d loss/d y", "d loss/d X"]):
        same(a, b, what)
    if isinstance(model, MixedModel):
        blups = [FitResult(REML(model, y, X, method=method, solver=sol), free, st, None,
                           True, 0, "ai").blups()
                 for sol, st in ((structured, s), (dense, d))]
        for term in model.term_names:
            same(torch.tensor(blups[0][term].to_numpy()),
                 torch.tensor(blups[1][term].to_numpy()), f"BLUP of {term}")


def _check_eigh(module, nat, i) -> None:
    V = module._evaluate(nat).detach()
    lam, Q = module._eigh(nat, V)
    scale = max(float(V.abs().max()), 1e-300)
    eye = torch.eye(V.shape[0], dtype=V.dtype, device=V.device)
    for what, got, expected, tol in (("_eigh's eigenvectors are not orthonormal", Q.T @ Q, eye,
                                      TOL),
                                     ("_eigh does not reconstruct the matrix",
                                      (Q * lam) @ Q.T, V, TOL * scale)):
        torch.testing.assert_close(got, expected, rtol=0, atol=tol,
                                   msg=lambda m, what=what: f"{what} at point {i}: {m}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
