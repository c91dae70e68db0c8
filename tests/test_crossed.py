"""Crossed random effects over processes: rows split in any way, one reduction of the sums."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from covmodules import (BlockDesignMatrix, IdentityMatrix, KroneckerProduct, MixedModel,
                        ScalarMatrix, UnconstrainedMatrix, fit)
from covmodules.crossed import CrossedREML
from gloo import free_port, join, leave

DT = torch.float64
LEVELS = {"a": 23, "b": 9, "c": 4}


def data(n=400, seed=0):
    """``y ~ x + (1 + x | a) + (1 | b) + (1 | c)``, three crossed factors."""
    g = torch.Generator().manual_seed(seed)
    codes = {name: torch.randint(0, m, (n,), generator=g) for name, m in LEVELS.items()}
    x = torch.randn(n, generator=g, dtype=DT)
    u = {name: torch.randn(m, 2, generator=g, dtype=DT) for name, m in LEVELS.items()}
    y = (2.0 + 0.5 * x + u["a"][codes["a"], 0] + 0.3 * u["a"][codes["a"], 1] * x
         + 0.7 * u["b"][codes["b"], 0] + u["c"][codes["c"], 0]
         + torch.randn(n, generator=g, dtype=DT))
    return codes, x, y, torch.stack([torch.ones(n, dtype=DT), x], 1)


def model_for(codes, x, rows):
    """The model of ``rows`` with the levels of the whole data."""
    ones = torch.ones(len(rows), dtype=DT)
    terms = {"a": (BlockDesignMatrix(codes["a"][rows], torch.stack([ones, x[rows]], 1),
                                     LEVELS["a"]),
                   KroneckerProduct(IdentityMatrix(LEVELS["a"]), UnconstrainedMatrix(2)))}
    for name in ("b", "c"):
        terms[name] = (BlockDesignMatrix(codes[name][rows], ones[:, None], LEVELS[name]),
                       ScalarMatrix(LEVELS[name]))
    return MixedModel(random=terms, residual=ScalarMatrix(len(rows)))


def summary(result):
    return {"free": result.free, "loglik": result.loglik, "beta": result.state.beta,
            "blups": {k: torch.as_tensor(v.iloc[:, 1:].to_numpy(dtype=float))
                      for k, v in result.blups().items()}}


def whole(method="reml"):
    codes, x, y, X = data()
    return fit(model_for(codes, x, torch.arange(len(y))), y, X, method=method)


def _worker(rank, world, port, out_file):
    join(rank, world, port)
    codes, x, y, X = data()
    rows = torch.arange(len(y))[torch.arange(len(y)) % world == rank]    # interleaved rows
    results = {}
    for method in ("reml", "ml"):
        objective = CrossedREML(model_for(codes, x, rows), y[rows], X[rows], method=method)
        result = fit(objective)
        results[method] = {**summary(result), "n": result.n,
                           "communicated": objective.communicated,
                           "fitted": torch.as_tensor(result.fitted()), "rows": rows,
                           "df": result.fixed_effects.df.to_numpy(),
                           "confint": result.confint().to_numpy() if method == "reml" else None,
                           "condsd": result.ranef().condsd.to_numpy()}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    leave(rank, gathered, out_file)


def test_two_gloo_processes_equal_the_single_process_fit_of_a_crossed_model(tmp_path):
    out_file = str(tmp_path / "crossed.pt")
    mp.spawn(_worker, args=(2, free_port(), out_file), nprocs=2, join=True)
    ranks = torch.load(out_file, weights_only=False)
    for method in ("reml", "ml"):
        reference = whole(method)
        ref, fitted = summary(reference), torch.as_tensor(reference.fitted())
        for rank in ranks:
            ours = rank[method]
            assert ours["n"] == reference.n
            assert ours["loglik"] == pytest.approx(ref["loglik"], rel=1e-10)
            torch.testing.assert_close(ours["free"], ref["free"], rtol=1e-8, atol=1e-8)
            torch.testing.assert_close(ours["beta"], ref["beta"], rtol=1e-8, atol=1e-8)
            for name, u in ref["blups"].items():
                torch.testing.assert_close(ours["blups"][name], u, rtol=1e-8, atol=1e-8)
            torch.testing.assert_close(ours["fitted"], fitted[ours["rows"]], rtol=1e-8,
                                       atol=1e-8)
            # Satterthwaite df and conditional SDs: the whole data's, from the sums
            np.testing.assert_allclose(ours["df"], reference.fixed_effects.df, rtol=1e-6)
            np.testing.assert_allclose(ours["condsd"], reference.ranef().condsd, rtol=1e-8)
            if method == "reml":       # profile refits: each reduces its changed sums
                np.testing.assert_allclose(ours["confint"], reference.confint().to_numpy(),
                                           rtol=1e-6)
        # both processes hold the same totals: q (p + 1) + (p + 1)² + ZᵀZ's blocks + n numbers
        assert ranks[0][method]["communicated"] == ranks[1][method]["communicated"] > 0


def test_one_process_equals_the_rows_solver_in_inference_too():
    """Profile intervals (refits with changed y and X), Satterthwaite df and conditional SDs
    of a fit on sufficient statistics equal those of the mme solver on the rows."""
    codes, x, y, X = data()
    rows = torch.arange(len(y))
    ours = fit(CrossedREML(model_for(codes, x, rows), y, X))
    ref = whole()
    assert ours.solver == "sufficient" and ref.solver == "mme"
    assert ours.loglik == pytest.approx(ref.loglik, rel=1e-10)
    torch.testing.assert_close(ours.free, ref.free, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ours.confint().to_numpy(), ref.confint().to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.fixed_effects.to_numpy(), ref.fixed_effects.to_numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(ours.ranef().condsd, ref.ranef().condsd, rtol=1e-8)


def test_crossed_objective_refuses_other_residuals_and_misfit_data():
    from covmodules import DiagonalMatrix
    codes, x, y, X = data()
    rows = torch.arange(len(y))
    model = model_for(codes, x, rows)
    model = MixedModel(random={name: (model.designs[name], model._modules[name])
                               for name in model.term_names}, residual=DiagonalMatrix(len(y)))
    with pytest.raises(ValueError, match="σ² I"):
        CrossedREML(model, y, X)
    with pytest.raises(ValueError, match="length"):
        CrossedREML(model_for(codes, x, rows), y[:-1], X)
