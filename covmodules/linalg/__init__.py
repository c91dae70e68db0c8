"""Likelihood solvers: dense Cholesky (the reference) and structured paths.

| structure | solver | cost of one factorisation |
|---|---|---|
| any ``V`` | ``"dense"`` | ``n³/3`` |
| ``A ⊗ B (+ σ² I)`` | ``"kronecker"`` | ``m³ + n³ + p mn(m + n)`` |
| block diagonal over one grouping factor | ``"grouped"`` | ``Σ n_g³/3`` |
| ``Σ Z_i G_i Z_iᵀ + R``, ``R`` diagonal | ``"woodbury"`` | ``n q² + q³`` |
| ``Σ Z_i (I ⊗ S_i) Z_iᵀ + R`` on block designs, ``R`` diagonal (crossed, nested) | ``"mme"`` | ``n (Σ k_i)² + Σ_j k_0 z_j² + s³/3`` |
| random terms over a block-diagonal Kronecker residual (trials) | ``"met"`` | per block |
| the ``"mme"`` models with ``R = σ² I``, on sufficient statistics (by name only) | ``"sufficient"`` | as ``"mme"``, nothing in ``n`` |

:func:`applicable_solvers` builds each solver whose structure the model has (a solver's
constructor reads the model's capability views, :mod:`covmodules.capabilities`, and raises
:class:`UnsupportedStructure` otherwise); :func:`select_solver` picks the one with the
smallest cost estimate (dense when none applies); ``solver="name"`` overrides it.

:func:`identify` fixes one scale of every Kronecker product whose factors both carry a free
variance (only their product is identified); the REML objectives call it when they are built
(:class:`~covmodules.reml.REML`, :class:`~covmodules.distributed.ShardedREML`), and
:func:`select_solver` leaves the model as it is.
"""

import warnings
from typing import Iterator

import torch

from ..operators.kronecker import KroneckerProduct
from .base import NotPositiveDefiniteError, Solver, UnsupportedStructure
from .dense import DenseSolver
from .environments import MultiEnvironmentSolver
from .grouped import GroupedSolver
from .kronecker import KroneckerSolver, complete_grid
from .mme import MMESolver
from .sufficient import SufficientSolver
from .woodbury import WoodburySolver

__all__ = ["NotPositiveDefiniteError", "UnsupportedStructure", "Solver", "DenseSolver",
           "applicable_solvers",
           "KroneckerSolver", "GroupedSolver", "WoodburySolver", "MMESolver", "SufficientSolver", "SOLVERS",
           "select_solver", "identify", "unidentified_kronecker", "complete_grid",
           "MultiEnvironmentSolver"]

SOLVERS: dict[str, type[Solver]] = {"dense": DenseSolver, "kronecker": KroneckerSolver,
                                    "grouped": GroupedSolver, "woodbury": WoodburySolver,
                                    "mme": MMESolver, "met": MultiEnvironmentSolver,
                                    "sufficient": SufficientSolver}


def select_solver(model, solver=None) -> Solver:
    """The solver for ``model``: by name, a :class:`Solver` instance, or chosen automatically
    (the cheapest solver whose structure the model has; dense when none applies).

    The model is not changed; a Kronecker product whose scale is not identified (see
    :func:`identify`) is warned about.
    """
    for path, _ in unidentified_kronecker(model):
        warnings.warn(f"both factors of the Kronecker product {path or 'model'!r} have a free "
                      "scale and only their product is identified (the AI matrix is "
                      "singular); fix one, e.g. with identify(model)", stacklevel=2)
    if isinstance(solver, Solver):
        if solver.model is not model:
            raise ValueError("solver was built for another model; pass a solver name or a "
                             "Solver of this model")
        return solver
    if solver is not None:
        if not isinstance(solver, str):
            raise TypeError(f"solver must be a name from {list(SOLVERS)} or a Solver instance, "
                            f"got {type(solver).__name__}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
        try:
            return SOLVERS[solver](model)
        except UnsupportedStructure as err:
            raise ValueError(f"solver {solver!r} does not apply to this model's structure: "
                             f"{err}") from None
    return min(applicable_solvers(model), key=lambda s: s.cost)


def applicable_solvers(model) -> list[Solver]:
    """A solver of each kind in :data:`SOLVERS` whose structure ``model`` has (dense always;
    those built only by name, :attr:`Solver.automatic` false, left out)."""
    out = []
    for cls in (c for c in SOLVERS.values() if c.automatic):
        try:
            out.append(cls(model))
        except UnsupportedStructure:
            continue
    return out


def identify(model) -> list[str]:
    """Fix one scale of each Kronecker product ``A ⊗ B`` whose factors both have one free.

    ``c A ⊗ B / c = A ⊗ B``: when both factors have a free overall scale (a direction of
    their free parameters along which the factor grows in proportion to itself) the REML
    surface is flat along ``c`` and the AI matrix singular. The second factor's ``sigma^2``
    is then fixed at its current value (the first factor's when the second has none), with a
    warning; a ``ValueError`` is raised when neither factor has a ``sigma^2`` to fix. Returns
    the names of the parameters fixed.
    """
    fixed = []
    for path, module in unidentified_kronecker(model):
        where = path or "model"
        for name, op in reversed(list(zip(module._operand_names, module.operand_modules))):
            if "sigma^2" in op.free_param_names:
                op.fix("sigma^2")
                full = "/".join(filter(None, (path, name, "sigma^2")))
                fixed.append(full)
                warnings.warn(f"{full} fixed at {op.get_param('sigma^2'):.6g}: both factors of "
                              f"the Kronecker product {where!r} have a free scale, "
                              "and only their product is identified", stacklevel=3)
                break
        else:
            raise ValueError(f"both factors of the Kronecker product {where!r} have "
                             "a free scale and only their product is identified; fix one "
                             "factor's scale (e.g. a diagonal element) before fitting")
    return fixed


def unidentified_kronecker(model) -> Iterator[tuple[str, KroneckerProduct]]:
    """``(path, product)`` of each Kronecker product in ``model`` whose factors both have a
    free scale (path ``"a/b"``, ``""`` for the model itself), each probed when reached."""
    for path, module in model.named_modules():
        if (isinstance(module, KroneckerProduct)
                and all(_free_scale(op) for op in module.operand_modules)):
            yield path.replace(".", "/"), module


def _free_scale(module) -> bool:
    """Whether ``M`` lies in the span of ``∂M/∂θ_k`` over the free parameters (probed in
    float64 on the module's device, to the module's precision)."""
    if module.num_free_params == 0:
        return False
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        M = module()
        tol = torch.finfo(M.dtype).eps ** 0.5
        W = torch.randn(module.shape[1], 2, generator=g, dtype=torch.float64).to(M.device)
        J = module.dV(W).to(torch.float64).reshape(module.num_free_params, -1).T
        target = (M.to(torch.float64) @ W).reshape(-1)
        coef = torch.linalg.lstsq(J, target[:, None]).solution
        residual = target - (J @ coef)[:, 0]
    return float(residual.norm()) <= tol * float(target.norm())
