"""Data-parallel REML: sharded over batches and over 2 gloo processes, exact."""

import contextlib
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from covmodules import (AR1Matrix, Grouped, IdentityMatrix, KroneckerProduct, MixedModel,
                        UnconstrainedMatrix, fit)
from covmodules.distributed import ShardedREML
from gloo import free_port, join, leave

DT = torch.float64
SIZES = [4, 6, 5, 7, 4, 5, 6, 3, 5, 6, 7, 4, 5, 6, 4, 5, 3, 6, 5, 4]     # 20 subjects


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    subject = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    time = torch.cat([torch.arange(s) for s in SIZES]).to(DT)
    n = len(subject)
    X = torch.stack([torch.ones(n, dtype=DT), time], 1)
    u = torch.randn(len(SIZES), 2, generator=g, dtype=DT) * torch.tensor([2.0, 0.5], dtype=DT)
    y = X @ torch.tensor([10.0, 0.5], dtype=DT) + u[subject, 0] + u[subject, 1] * time
    y = y + torch.randn(n, generator=g, dtype=DT)
    return subject, time, y, X


def model_for(subject, time):
    """Random intercept + slope per subject, AR(1) residual within subject, for these rows."""
    levels, codes = torch.unique(subject, return_inverse=True)
    Z = torch.zeros(len(subject), 2 * len(levels), dtype=DT)
    Z[torch.arange(len(subject)), 2 * codes] = 1.0
    Z[torch.arange(len(subject)), 2 * codes + 1] = time
    G = KroneckerProduct(levels=IdentityMatrix(len(levels)), terms=UnconstrainedMatrix(2))
    return MixedModel(random={"subject": (Z, G)},
                      residual=Grouped(serial=AR1Matrix(max(SIZES)), groups=codes))


def shards(subject_sets, seed=0):
    subject, time, y, X = data(seed)
    out = []
    for subjects in subject_sets:
        rows = torch.isin(subject, torch.tensor(subjects))
        out.append((model_for(subject[rows], time[rows]), y[rows], X[rows]))
    return out


def whole_fit(method, **kwargs):
    subject, time, y, X = data()
    return fit(model_for(subject, time), y, X, optimizer=method, solver="grouped", **kwargs)


def test_batches_give_the_exact_one_batch_loss_gradient_and_ai():
    one = ShardedREML(shards([list(range(20))]))
    three = ShardedREML(shards([[0, 1, 2], list(range(3, 11)), list(range(11, 20))]))
    free = 0.3 * torch.randn(one.model.num_free_params, generator=torch.Generator().manual_seed(1),
                             dtype=DT)
    s1, s3 = one.state(free), three.state(free)
    assert float(s3.neg_loglik) == pytest.approx(float(s1.neg_loglik), rel=1e-12)
    torch.testing.assert_close(three.gradient(free, s3), one.gradient(free, s1),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(three.average_information(free, s3),
                               one.average_information(free, s1), rtol=1e-10, atol=1e-10)
    x1, x3 = free.clone().requires_grad_(True), free.clone().requires_grad_(True)
    one.loss(x1).backward()
    three.loss(x3).backward()
    torch.testing.assert_close(x3.grad, x1.grad, rtol=1e-10, atol=1e-10)


def test_single_shard_equals_the_unsharded_grouped_objective():
    subject, time, y, X = data()
    from covmodules.reml import REML
    reference = REML(model_for(subject, time), y, X, solver="grouped")
    sharded = ShardedREML(shards([list(range(20))]))
    free = torch.zeros(sharded.model.num_free_params, dtype=DT)
    assert sharded.loglik(free) == pytest.approx(reference.loglik(free), rel=1e-12)
    assert sharded.residual_variance() == pytest.approx(reference.residual_variance(), rel=1e-12)


def _worker(rank, world, port, out_file):
    join(rank, world, port)
    # uneven: rank 0 holds 7 subjects in one batch, rank 1 holds 13 in two batches
    sets = [[list(range(7))], [list(range(7, 12)), list(range(12, 20))]][rank]
    results = {}
    for method, kwargs in (("ai", {}), ("lbfgs", {}), ("adam", {"max_iter": 60})):
        objective = ShardedREML(shards(sets))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # adam stops at max_iter on purpose
            result = fit(objective, optimizer=method, **kwargs)
        results[method] = (result.free.clone(), result.loglik, result.iterations)
    leave(rank, results, out_file)


def test_two_gloo_processes_equal_the_single_process_fit(tmp_path):
    out_file = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(2, free_port(), out_file), nprocs=2, join=True)
    results = torch.load(out_file)
    for method, kwargs in (("ai", {}), ("lbfgs", {}), ("adam", {"max_iter": 60})):
        with pytest.warns(UserWarning) if method == "adam" else contextlib.nullcontext():
            reference = whole_fit(method, **kwargs)
        free, loglik, iterations = results[method]
        print(f"{method}: {iterations} iterations, logLik {loglik:.10f} "
              f"(single process {reference.loglik:.10f})")
        assert loglik == pytest.approx(reference.loglik, rel=1e-8)
        torch.testing.assert_close(free, reference.free, rtol=1e-8, atol=1e-8)



def test_a_shard_whose_v_is_not_positive_definite_fails_on_every_process_alike():
    from covmodules import SimpleMatrix
    from covmodules.linalg import NotPositiveDefiniteError
    from covmodules.transforms import Identity

    def equicorrelated(T):        # 1 on the diagonal, c elsewhere: not PD for c <= -1/(T-1)
        return SimpleMatrix(lambda nat: (1 - nat[0]) * torch.eye(T, dtype=nat.dtype) + nat[0],
                            (T, T), {"c": (0.0, Identity())})

    small = torch.tensor([0, 0, 1, 1])                    # blocks of 2: PD for c > -1
    large = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])        # blocks of 4: PD for c > -1/3
    y = torch.arange(12, dtype=DT)
    objective = ShardedREML([(Grouped(s=equicorrelated(4), groups=small), y[:4], None),
                             (Grouped(s=equicorrelated(4), groups=large), y[4:], None)])
    assert torch.isfinite(objective.state(torch.tensor([-0.2], dtype=DT)).neg_loglik)
    with pytest.raises(NotPositiveDefiniteError, match="1 shard"):
        objective.state(torch.tensor([-0.5], dtype=DT))
