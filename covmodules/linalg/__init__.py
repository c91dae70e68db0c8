"""Likelihood solvers: dense Cholesky (the reference) and structured paths."""

from .base import NotPositiveDefiniteError, Solver
from .dense import DenseSolver

__all__ = ["NotPositiveDefiniteError", "Solver", "DenseSolver", "SOLVERS", "select_solver"]

SOLVERS: dict[str, type[Solver]] = {"dense": DenseSolver}


def select_solver(model, solver=None) -> Solver:
    """The solver for ``model``: by name, a :class:`Solver` instance, or chosen automatically
    (the first structured solver that supports the model, else dense)."""
    if isinstance(solver, Solver):
        return solver
    if solver is not None:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
        cls = SOLVERS[solver]
        if not cls.supports(model):
            raise ValueError(f"solver {solver!r} does not apply to this model's structure")
        return cls(model)
    for cls in SOLVERS.values():
        if cls is not DenseSolver and cls.supports(model):
            return cls(model)
    return DenseSolver(model)
