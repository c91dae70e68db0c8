"""One likelihood core: additive GLS statistics, the dense path as a Factor, dense shards."""

import math

import numpy as np
import pytest
import torch

from covmodules import AR1Matrix, Grouped, SimpleMatrix, fit
from covmodules.distributed import ShardedREML
from covmodules.linalg import DenseSolver, GroupedSolver
from covmodules.linalg.dense import DenseFactor
from covmodules.linalg.statistics import GLSStatistics
from covmodules.reml import REML
from covmodules.transforms import ExpPow2, Sigmoid

DT = torch.float64


def reference_neg_loglik(V, y, X, method):
    """Independent NumPy -l on R's scale."""
    V, y, X = (a.detach().numpy() for a in (V, y, X))
    n, p = X.shape
    Vi = np.linalg.inv(V)
    A = X.T @ Vi @ X
    r = y - X @ np.linalg.solve(A, X.T @ Vi @ y)
    core = np.linalg.slogdet(V)[1] + r @ Vi @ r
    if method == "reml":
        return 0.5 * (core + np.linalg.slogdet(A)[1]) + 0.5 * (n - p) * math.log(2 * math.pi)
    return 0.5 * core + 0.5 * n * math.log(2 * math.pi)


def random_spd(n, g):
    A = torch.randn(n, n, generator=g, dtype=DT)
    return A @ A.T + n * torch.eye(n, dtype=DT)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_statistics_of_blocks_add_up_to_the_whole(method):
    g = torch.Generator().manual_seed(0)
    sizes = [3, 5, 4]
    blocks = [random_spd(m, g) for m in sizes]
    y = torch.randn(sum(sizes), generator=g, dtype=DT)
    X = torch.randn(sum(sizes), 2, generator=g, dtype=DT)
    V = torch.block_diag(*blocks)
    rows = np.cumsum([0] + sizes)
    parts = [GLSStatistics.of(DenseFactor(B), y[a:b], X[a:b])
             for B, a, b in zip(blocks, rows[:-1], rows[1:])]
    total = parts[0] + parts[1] + parts[2]
    whole = GLSStatistics.of(DenseFactor(V), y, X)
    for name in ("logdet", "A", "b", "c", "n"):
        torch.testing.assert_close(getattr(total, name), getattr(whole, name), rtol=1e-12,
                                   atol=1e-12)
    ref = reference_neg_loglik(V, y, X, method)
    assert float(total.finish(method).neg_loglik) == pytest.approx(ref, rel=1e-12)
    same = GLSStatistics.from_flat(total.flat(), 2)
    assert float(same.finish(method).neg_loglik) == pytest.approx(ref, rel=1e-12)
    assert total.all_reduce() is total                      # no process group: itself


def test_dense_solver_is_a_factor_solver():
    g = torch.Generator().manual_seed(1)
    subject = torch.arange(24) // 4
    model = Grouped(AR1Matrix(4), groups=subject)
    y = torch.randn(24, generator=g, dtype=DT)
    X = torch.ones(24, 1, dtype=DT)
    free = torch.tensor([0.3, -0.4], dtype=DT)
    dense, grouped = DenseSolver(model), GroupedSolver(model)
    d, s = dense.state(free, y, X, "reml"), grouped.state(free, y, X, "reml")
    assert isinstance(d.factor, DenseFactor)
    assert float(d.neg_loglik) == pytest.approx(reference_neg_loglik(model(free), y, X, "reml"),
                                                rel=1e-12)
    torch.testing.assert_close(d.Py, s.Py, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense.gradient(free, d), grouped.gradient(free, s), rtol=1e-10,
                               atol=1e-12)


def exponential_block(times):
    """A block only the dense solver factors: σ² exp(-|t_i - t_j| / range) on given times."""
    t = torch.as_tensor(times, dtype=DT)
    distance = (t[:, None] - t[None, :]).abs()

    def fn(theta):
        return theta[0] * torch.exp(-distance / theta[1]) + theta[2] * torch.eye(len(t),
                                                                                dtype=DT)

    return SimpleMatrix(fn, (len(t), len(t)), {"sigma^2": (0.0, ExpPow2()),
                                                "range": (0.0, Sigmoid()),
                                                "nugget": (-1.0, ExpPow2())})


def test_sharded_dense_shards_equal_the_unsharded_fit():
    """Shards that only the dense path can factor (they were refused): the sharded fit sums
    their statistics and equals the fit of the whole block-diagonal V."""
    g = torch.Generator().manual_seed(2)
    times = [torch.rand(m, generator=g, dtype=DT).sort().values * 3 for m in (6, 9, 7)]
    y = [torch.randn(len(t), generator=g, dtype=DT) + 1.0 for t in times]
    shards = [(exponential_block(t), yy, None) for t, yy in zip(times, y)]
    sharded = fit(ShardedREML(shards))
    assert sharded.solver == "dense" and sharded.converged
    all_times = torch.cat([t + 1e3 * i for i, t in enumerate(times)])   # exp(-1e3) = 0 apart
    whole_model = exponential_block(all_times)
    objective = ShardedREML(shards)
    free = torch.tensor([0.2, -0.3, -0.8], dtype=DT)
    state = objective.state(free)
    whole = REML(whole_model, torch.cat(y))
    reference = whole.state(free)
    assert float(state.neg_loglik) == pytest.approx(float(reference.neg_loglik), rel=1e-12)
    torch.testing.assert_close(objective.gradient(free, state), whole.gradient(free, reference),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(objective.average_information(free, state),
                               whole.average_information(free, reference), rtol=1e-10,
                               atol=1e-12)
    result = fit(whole_model, torch.cat(y))                  # the same iterations
    assert result.iterations == sharded.iterations
    assert result.loglik == pytest.approx(sharded.loglik, abs=1e-10)
    for name, value in result.params.items():
        assert sharded.params[name] == pytest.approx(value, rel=1e-8)
