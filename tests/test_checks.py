"""No silent wrong answer: every entry point validates its data one way, drops aliased columns
of X on the whole data's decision, refuses degenerate designs (lme4's checks, each of which
``Checks`` turns off) and exactly singular V, and handles p = 0 and odd dtypes."""

import warnings

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from covmodules import (AR1Matrix, BlockDesignMatrix, CAR1Matrix, DesignMatrix,
                        EqualEntryMatrix, Grouped, GroupedCovariance, IdentityMatrix,
                        KroneckerProduct, MixedModel, RandomIntercept, ScalarMatrix, Sum,
                        UnconstrainedMatrix, fit)
from covmodules.checks import Checks, identical_rows
from covmodules.design import drop_aliased, independent_columns, random_design
from covmodules.distributed import ShardedREML
from covmodules.linalg import NotPositiveDefiniteError
from covmodules.linalg.dense import cholesky
from covmodules.reml import REML
from training import MixedModelDataModule, REMLModule
from gloo import free_port, join

DT = torch.float64
SLEEP = pd.read_csv("tests/data/sleepstudy.csv", dtype={"Subject": str})


def slope_model(df):
    """lme4's ``(Days | Subject)`` with a scalar residual, for the rows of ``df``."""
    Z = random_design(df, "Subject", ["1", "Days"])
    G = KroneckerProduct(subjects=IdentityMatrix(Z.num_levels), effects=UnconstrainedMatrix(2))
    return MixedModel(random={"Subject": (Z, G)}, residual=ScalarMatrix(len(df)))


def sleep_shards(X, subjects_per_shard=6):
    y = torch.tensor(SLEEP.Reaction.to_numpy(), dtype=DT)
    subjects = SLEEP.Subject.unique()
    out = []
    for i in range(0, len(subjects), subjects_per_shard):
        rows = np.flatnonzero(SLEEP.Subject.isin(subjects[i:i + subjects_per_shard]))
        index = torch.as_tensor(rows)
        out.append((slope_model(SLEEP.iloc[rows]), y[index], X[index]))
    return out


def aliased_sleep_x():
    days = torch.tensor(SLEEP.Days.to_numpy(), dtype=DT)
    return torch.stack([torch.ones(len(days), dtype=DT), days, 2 * days], 1)


def warning_messages(caught):
    return [str(w.message) for w in caught if "aliased" in str(w.message)]


def intercept_problem(sizes, seed=0, slope=False):
    """``y ~ 1 + (1 | g)`` (or ``(1 + t | g)``) with groups of the given sizes."""
    g = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    t = torch.cat([torch.arange(s) for s in sizes]).to(DT)
    y = torch.randn(len(g), generator=torch.Generator().manual_seed(seed), dtype=DT) + t
    values = torch.stack([torch.ones_like(t), t], 1) if slope else torch.ones(len(g), 1, dtype=DT)
    Z = BlockDesignMatrix(g, values, len(sizes))
    G = (KroneckerProduct(levels=IdentityMatrix(len(sizes)), terms=UnconstrainedMatrix(2))
         if slope else ScalarMatrix(len(sizes)))
    return MixedModel(random={"g": (Z, G)}, residual=ScalarMatrix(len(g))), y


# ------------------------------------------------------------ A: aliased columns, one decision
def test_sharded_sleepstudy_drops_the_aliased_column_like_the_plain_fit():
    X, names = aliased_sleep_x(), ["(Intercept)", "Days", "2*Days"]
    y = torch.tensor(SLEEP.Reaction.to_numpy(), dtype=DT)
    with warnings.catch_warnings(record=True) as plain_warnings:
        warnings.simplefilter("always")
        plain = fit(slope_model(SLEEP), y, X, x_names=names)
    with warnings.catch_warnings(record=True) as sharded_warnings:
        warnings.simplefilter("always")
        objective = ShardedREML(sleep_shards(X), x_names=names)
    sharded = fit(objective)
    expected = ["fixed-effect model matrix is rank deficient: dropping aliased column(s) "
                "['2*Days']"]
    assert warning_messages(plain_warnings) == warning_messages(sharded_warnings) == expected
    assert plain.objective.dropped == objective.dropped == ["2*Days"]
    assert objective.x_names == ["(Intercept)", "Days"] and objective.p == 2
    assert sharded.converged and plain.converged
    assert sharded.loglik == pytest.approx(-871.8141, abs=1e-4)      # lme4
    assert sharded.loglik == pytest.approx(plain.loglik, rel=1e-10)
    assert list(sharded.fixed_effects.index) == ["(Intercept)", "Days"]
    np.testing.assert_allclose(sharded.fixed_effects.estimate, plain.fixed_effects.estimate,
                               rtol=1e-8)


def test_aliasing_is_decided_on_the_whole_data_not_per_shard():
    # "late" is zero on the first shard (aliased there) and "copy" equals the intercept on
    # the second shard only; on the whole data both are independent columns
    subject = torch.repeat_interleave(torch.arange(8), 5)
    t = torch.arange(5, dtype=DT).repeat(8)
    late = (subject >= 4).to(DT) * t
    copy = torch.where(subject >= 4, 1.0, 0.5 + t ** 2 / 10).to(DT)
    X = torch.stack([torch.ones_like(t), t, late, copy], 1)
    y = torch.randn(40, generator=torch.Generator().manual_seed(3), dtype=DT) + t
    rows = [slice(0, 20), slice(20, 40)]
    shards = [(Grouped(AR1Matrix(5), groups=subject[r]), y[r], X[r]) for r in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no column is dropped
        objective = ShardedREML(shards, x_names=["a", "t", "late", "copy"])
        whole = REML(Grouped(AR1Matrix(5), groups=subject), y, X, x_names=objective.x_names)
    assert objective.x_names == whole.x_names == ["a", "t", "late", "copy"]
    assert drop_aliased(X[:20], objective.x_names)[2] == ["late"]    # what each shard alone
    assert drop_aliased(X[20:], objective.x_names)[2] == ["late", "copy"]    # would decide
    free = torch.tensor([0.2, 0.3], dtype=DT)
    assert objective.loglik(free) == pytest.approx(whole.loglik(free), rel=1e-12)


def test_independent_columns_is_greedy_in_column_order_on_the_gram_matrix():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 3, generator=g, dtype=DT)
    X = torch.stack([A[:, 0], torch.zeros(30, dtype=DT), A[:, 1], A[:, 0] - A[:, 1],
                     A[:, 2], A[:, 2] * (1 + 1e-9) + 1e-12 * A[:, 0]], 1)
    assert independent_columns(X.T @ X) == [0, 2, 4]
    assert independent_columns((1e8 * X).T @ (1e8 * X)) == [0, 2, 4]     # scale-free
    with pytest.raises(ValueError, match="square"):
        independent_columns(X)


def test_a_level_only_in_held_out_groups_is_dropped_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(16):
        u = rng.normal(0, 2)
        rows += [(f"s{s:02d}", t, "A", 10 + 0.5 * t + u + rng.normal()) for t in range(5)]
    df = pd.DataFrame(rows, columns=["subject", "t", "site", "y"])
    spec = {"response": "y", "fixed": ["t", "site"], "random": {"subject": {"group": "subject"}}}
    path = tmp_path / "data.csv"
    df.to_csv(path, index=False)
    probe = MixedModelDataModule(str(path), **spec, val_fraction=0.25)
    probe.setup("fit")
    held_out = set(pd.concat([b.problem.frame for b in probe.val_batches]).subject)
    df.loc[df.subject.isin(held_out), "site"] = "B"        # level B: validation groups only
    df.to_csv(path, index=False)
    for groups_per_batch in (None, 4):                      # REML, and ShardedREML over batches
        dm = MixedModelDataModule(str(path), **spec, val_fraction=0.25,
                                  groups_per_batch=groups_per_batch)
        module = REMLModule()
        trainer = L.Trainer(accelerator="cpu", max_epochs=50, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=dm)
        assert ("fixed-effect model matrix is rank deficient: dropping aliased column(s) "
                "['siteB']") in warning_messages(caught)
        assert module.sharded == (groups_per_batch is not None)
        assert module.objective.dropped == ["siteB"]
        assert list(module.result.fixed_effects.index) == ["(Intercept)", "t"]
        assert module.converged and np.isfinite(trainer.callback_metrics["val/mse"].item())


# ------------------------------------------------------------------ A: y fitted exactly
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_y_fitted_exactly_by_x_is_refused_at_every_scale(scale):
    subject = torch.repeat_interleave(torch.arange(6), 4)
    t = torch.arange(4, dtype=DT).repeat(6)
    X = torch.stack([torch.ones_like(t), t], 1)
    random = MixedModel(random={"g": (DesignMatrix(subject), ScalarMatrix(6))},
                        residual=ScalarMatrix(24))
    for model, y, Xy in ((ScalarMatrix(24), torch.full((24,), 3.0, dtype=DT), None),
                         (random, torch.full((24,), 3.0, dtype=DT), None),
                         (random, 2.0 - 0.7 * t, X)):
        with pytest.raises(ValueError, match=r"y is fitted exactly by the \d column\(s\) of X "
                                             r"\(residual sum of squares 0"):
            fit(model, scale * y, Xy)
    noisy = scale * (2.0 - 0.7 * t + 1e-9 * torch.randn(24, generator=torch.Generator()
                                                        .manual_seed(0), dtype=DT))
    result = fit(ScalarMatrix(24), noisy, X)        # residuals 1e-9 of y: a variance exists
    assert result.converged
    assert result.params["sigma^2"] == pytest.approx((scale * 1e-9) ** 2, rel=0.6)


def test_sharded_exact_fit_is_decided_on_the_reduced_sums():
    # each shard's y is constant (fitted exactly by its own intercept), the whole data's not
    groups = torch.arange(8) // 4
    shards = [(Grouped(AR1Matrix(4), groups=groups), torch.full((8,), c, dtype=DT), None)
              for c in (1.0, 2.0, 4.0)]
    assert ShardedREML(shards).residual_variance() > 0
    same = [(Grouped(AR1Matrix(4), groups=groups), torch.full((8,), 5.0, dtype=DT), None)
            for _ in range(3)]
    with pytest.raises(ValueError, match="y is fitted exactly"):
        ShardedREML(same)


# ------------------------------------------------------------------- B: degenerate designs
@pytest.mark.parametrize("case, sizes, slope, options", [
    ("one group", [12], False, ["levels_gt_1"]),
    ("one row per level", [1] * 10, False, ["obs_gt_levels", "obs_gt_effects"]),
    ("groups of 1 with a random slope", [1] * 6 + [2] * 2, True, ["obs_gt_effects"]),
    ("groups of 2 with a random slope", [2] * 6, True, ["obs_gt_effects"]),
])
def test_degenerate_random_terms_are_refused_and_can_be_allowed(case, sizes, slope, options):
    model, y = intercept_problem(sizes, slope=slope)
    override = "Checks(" + ", ".join(f"{o}=False" for o in options) + ")"
    with pytest.raises(ValueError, match=r"^random term 'g' has .*Pass checks="
                                         + override.replace("(", r"\(").replace(")", r"\)")):
        fit(model, y)
    checks = Checks(**{o: False for o in options})
    objective = REML(model, y, checks=checks)           # built: the checks are off
    assert objective.n == len(y)


def test_lme4_thresholds_of_the_design_checks():
    # lme4 stops when nlev >= nobs and when nobs <= nRE; one fewer level or effect passes
    for sizes, slope in (([1] * 8 + [2], False),   # 9 levels for 10 rows
                         ([2] * 5 + [3], True)):   # 12 random effects for 13 rows
        model, y = intercept_problem(sizes, slope=slope)
        REML(model, y)
    model, y = intercept_problem([2], slope=False)   # 1 level
    with pytest.raises(ValueError, match=r"has 1 level\(s\).*check.nlev.gtr.1"):
        REML(model, y)


def test_grouped_structure_with_one_row_per_group_is_refused():
    model = Sum(serial=Grouped(AR1Matrix(3), groups=torch.arange(9), positions=torch.arange(9) % 3),
                nugget=ScalarMatrix(9))
    y = torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=DT)
    with pytest.raises(ValueError, match=r"the Grouped structure 'serial' has one row per "
                                         r"group \(9 groups for 9 rows\).*obs_gt_levels=False"):
        fit(model, y)
    REML(model, y, checks=Checks(obs_gt_levels=False))
    REML(Grouped(AR1Matrix(4), groups=torch.tensor([0, 0, 0, 0])), y[:4])   # one series: fine


def test_sharded_design_checks_count_levels_over_all_shards():
    X = aliased_sleep_x()[:, :2]
    one_subject_each = sleep_shards(X, subjects_per_shard=1)       # each shard: one level
    assert ShardedREML(one_subject_each).n == 180
    y = intercept_problem([1] * 10)[1]
    shards = [(intercept_problem([1] * 5)[0], y[:5], None),
              (intercept_problem([1] * 5)[0], y[5:], None)]
    with pytest.raises(ValueError, match="random term 'g' has 10 levels for 10 observations"):
        ShardedREML(shards)
    ShardedREML(shards, checks=Checks(obs_gt_levels=False, obs_gt_effects=False))


def test_checks_reach_every_entry_point():
    model, y = intercept_problem([1] * 10)
    off = Checks(obs_gt_levels=False, obs_gt_effects=False)
    with pytest.raises(ValueError, match="one row per level"):
        REMLModule(model, y).objective
    assert REMLModule(model, y, checks=off).objective.n == 10
    layer = RandomIntercept(num_levels=10)
    groups = torch.arange(10)
    X = torch.ones(10, 1, dtype=DT)
    with pytest.raises(ValueError, match="one row per level"):
        layer.reml(y, X, groups)
    assert torch.isfinite(layer.reml(y, X, groups, checks=off))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # the variances are confounded, as refused
        assert fit(model, y, checks=off).n == 10
    with pytest.raises(TypeError, match="checks must be a covmodules.checks.Checks, got dict"):
        REML(model, y, checks={"obs_gt_levels": False})


# ------------------------------------------------------------------ C: exactly singular V
def repeated_position():
    groups = torch.arange(20) // 4
    positions = torch.tensor([0, 1, 2, 3] * 5)
    positions[5] = 0                                      # group 1: rows 4 and 5 at position 0
    y = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=DT)
    return groups, positions, y


@pytest.mark.parametrize("solver", ["dense", "grouped"])
def test_two_rows_at_one_position_without_a_nugget_are_refused(solver):
    groups, positions, y = repeated_position()
    with pytest.raises(ValueError, match=r"V is singular \(not positive definite\) for every "
                                         r"parameter value: rows 4 and 5 .*nugget"):
        fit(Grouped(AR1Matrix(4), groups=groups, positions=positions), y, solver=solver)
    nugget = Sum(serial=Grouped(AR1Matrix(4), groups=groups, positions=positions),
                 nugget=ScalarMatrix(20))
    assert fit(nugget, y, solver=solver).converged
    # the check off, the solvers' backstop refuses V singular up to rounding (logLik was -1e12)
    with pytest.raises(NotPositiveDefiniteError):
        fit(Grouped(AR1Matrix(4), groups=groups, positions=positions), y, solver=solver,
            checks=Checks(singular_v=False))


def test_a_repeated_car1_time_is_refused():
    times = torch.tensor([0.0, 1.0, 1.0, 2.5, 3.0, 4.0, 5.0, 6.0])
    y = torch.randn(8, generator=torch.Generator().manual_seed(2), dtype=DT)
    with pytest.raises(ValueError, match="rows 1 and 2 are identical"):
        fit(CAR1Matrix(times), y)
    assert fit(Sum(car=CAR1Matrix(times), nugget=ScalarMatrix(8)), y).converged
    with pytest.raises(NotPositiveDefiniteError):
        fit(CAR1Matrix(times), y, checks=Checks(singular_v=False))


def partition(classes):
    """Row classes relabelled in order of first appearance."""
    first = {}
    return [first.setdefault(int(c), len(first)) for c in classes]


def test_identical_rows_of_composite_structures():
    assert partition(identical_rows(EqualEntryMatrix(3))) == [0, 0, 0]
    kron = KroneckerProduct(a=CAR1Matrix([0.0, 0.0]), b=AR1Matrix(2))   # rows (a, b)
    assert partition(identical_rows(kron)) == [0, 1, 0, 1]
    # a random term's Z separates rows only where its rows differ
    Z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    residual = Grouped(AR1Matrix(1), groups=[0, 1, 2], positions=[0, 0, 0])
    model = MixedModel(random={"g": (Z, ScalarMatrix(2))}, residual=residual)
    assert identical_rows(model) is None              # the residual separates the groups
    same = Grouped(EqualEntryMatrix(3), groups=[0, 0, 0])
    model = MixedModel(random={"g": (Z, ScalarMatrix(2))}, residual=same)
    assert partition(identical_rows(model)) == [0, 0, 1]
    with pytest.raises(ValueError, match="rows 0 and 1 are identical"):
        REML(model, torch.tensor([1.0, 2.0, 4.0], dtype=DT), torch.zeros(3, 0, dtype=DT))


def test_layer_without_a_nugget_names_the_repeated_rows():
    layer = GroupedCovariance(AR1Matrix(3), num_levels=2, nugget=False)
    y, g = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="rows 0 and 1 are identical"):
        layer.nll(y, torch.zeros(3), g, torch.tensor([1, 1, 0]))
    assert torch.isfinite(layer.nll(y, torch.zeros(3), g, torch.tensor([0, 1, 0])))


def test_cholesky_backstop_refuses_pivots_at_rounding_level():
    s = 0.1                                          # rows 0 and 1 repeat: exactly singular
    singular = torch.tensor([[s, s, s / 2], [s, s, s / 2], [s / 2, s / 2, s]], dtype=DT)
    assert int(torch.linalg.cholesky_ex(singular).info) == 0        # "succeeds" on rounding
    with pytest.raises(NotPositiveDefiniteError, match="not PD"):
        cholesky(singular, "not PD")
    near = singular + 1e-9 * torch.eye(3, dtype=DT)  # ill-conditioned but positive definite
    torch.testing.assert_close(cholesky(near, "not PD"), torch.linalg.cholesky(near))
    with pytest.raises(NotPositiveDefiniteError):    # one block of a batch is enough
        cholesky(torch.stack([near, singular]), "not PD")


# ------------------------------------------------------------------ D: p = 0 and dtypes
@pytest.mark.parametrize("model, solver", [
    (lambda: Grouped(AR1Matrix(4), groups=torch.arange(20) // 4), "dense"),
    (lambda: Grouped(AR1Matrix(4), groups=torch.arange(20) // 4), "grouped"),
    (lambda: MixedModel(random={"g": (DesignMatrix(torch.arange(20) // 4), ScalarMatrix(5))},
                        residual=ScalarMatrix(20)), "woodbury"),
    (lambda: Sum(field=KroneckerProduct(AR1Matrix(5), AR1Matrix(4)), nugget=ScalarMatrix(20)),
     "kronecker"),
])
def test_no_fixed_effects_on_every_solver(model, solver):
    y = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=DT)
    none = torch.zeros(20, 0, dtype=DT)
    reml = fit(model(), y, none, solver=solver)
    ml = fit(model(), y, none, solver=solver, method="ml")
    assert reml.converged and reml.objective.p == 0
    assert reml.loglik == pytest.approx(ml.loglik, rel=1e-10)      # no fixed effects: REML = ML
    assert list(reml.fixed_effects.index) == []
    with pytest.warns(UserWarning, match=r"dropping aliased column\(s\) \['x0'\]"):
        zero = fit(model(), y, torch.zeros(20, 1, dtype=DT), solver=solver)
    assert zero.objective.p == 0 and zero.loglik == pytest.approx(reml.loglik, rel=1e-10)


def test_no_fixed_effects_sharded():
    groups = torch.arange(20) // 4
    y = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=DT)
    none = torch.zeros(20, 0, dtype=DT)
    shards = [(Grouped(AR1Matrix(4), groups=groups[r]), y[r], none[r])
              for r in (slice(0, 8), slice(8, 20))]
    whole = fit(Grouped(AR1Matrix(4), groups=groups), y, none)
    assert fit(ShardedREML(shards)).loglik == pytest.approx(whole.loglik, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32])
def test_narrow_and_integer_y_are_taken_as_float64(dtype):
    groups = torch.arange(20) // 4
    y = (10 * torch.randn(20, generator=torch.Generator().manual_seed(0))).to(dtype)
    result = fit(Grouped(AR1Matrix(4), groups=groups), y)
    reference = fit(Grouped(AR1Matrix(4), groups=groups), y.to(DT))
    assert result.objective.y.dtype == DT
    assert result.loglik == pytest.approx(reference.loglik, rel=1e-12)


def test_every_entry_point_refuses_bad_data_with_the_same_message():
    model, y = intercept_problem([3] * 5)
    X = torch.ones(15, 1, dtype=DT)
    cases = [(y.to(torch.complex128), X, TypeError, r"y must hold real numbers .*complex128"),
             (y > 0, X, TypeError, r"y must hold real numbers .*torch.bool"),
             (y, X.numpy(), TypeError, "X must be a torch.Tensor, got ndarray"),
             (y.numpy(), X, TypeError, "y must be a torch.Tensor, got ndarray"),
             (torch.where(torch.arange(15) == 2, float("nan"), y), X, ValueError,
              "y contains 1 NaN or inf values"),
             (y, X[:-1], ValueError, r"X must have shape \(n, p\) with n = len\(y\) = 15"),
             (y, X[:, 0], ValueError, r"X must have shape \(n, p\), got \(15,\)")]
    entry_points = {
        "fit": lambda y, X: fit(model, y, X),
        "REML": lambda y, X: REML(model, y, X),
        "ShardedREML": lambda y, X: ShardedREML([(model, y, X)]),
        "REMLModule": lambda y, X: REMLModule(model, y, X).objective,
    }
    for y_bad, X_bad, error, message in cases:
        for name, call in entry_points.items():
            expected = ("shard 0: " if name == "ShardedREML" else "") + message
            with pytest.raises(error, match=expected):
                call(y_bad, X_bad)
    layer = RandomIntercept(num_levels=5)
    groups = torch.arange(15) // 3
    for y_bad, X_bad, error, message in cases[:2] + cases[4:5]:
        with pytest.raises(error, match=message):
            layer.nll(y_bad, torch.zeros(15), groups)
        with pytest.raises(error, match=message):
            layer.reml(y_bad, X_bad, groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_data_on_the_cpu_follow_a_model_on_the_gpu():
    groups = torch.arange(20) // 4
    y = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=DT)
    model = Grouped(AR1Matrix(4), groups=groups).cuda()
    result = fit(model, y, torch.ones(20, 1, dtype=DT))
    assert result.objective.y.device.type == "cuda"
    assert result.loglik == pytest.approx(fit(Grouped(AR1Matrix(4), groups=groups), y).loglik,
                                          rel=1e-10)


# ------------------------------------------------------------------ two gloo processes
def _worker(rank, world, port, out_file):
    join(rank, world, port)
    X = aliased_sleep_x()
    shards = sleep_shards(X)
    mine = shards[:1] if rank == 0 else shards[1:]
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objective = ShardedREML(mine, x_names=["(Intercept)", "Days", "2*Days"])
    out["dropped"], out["warnings"] = objective.dropped, warning_messages(caught)
    out["loglik"] = fit(objective).loglik
    bad = [(m, y.clone(), X) for m, y, X in mine]
    if rank == 1:
        bad[0][1][0] = float("nan")              # only process 1's data are refused
    try:
        ShardedREML(bad)
    except ValueError as err:
        out["error"] = str(err)
    torch.save(out, f"{out_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_drop_the_same_columns_and_fail_together(tmp_path):
    out_file = str(tmp_path / "out")
    mp.spawn(_worker, args=(2, free_port(), out_file), nprocs=2, join=True)
    ranks = [torch.load(f"{out_file}.{rank}") for rank in range(2)]
    for r in ranks:
        assert r["dropped"] == ["2*Days"]
        assert r["warnings"] == ["fixed-effect model matrix is rank deficient: dropping "
                                 "aliased column(s) ['2*Days']"]
        assert r["loglik"] == pytest.approx(-871.8141, abs=1e-4)
    assert ranks[1]["error"] == "shard 0: y contains 1 NaN or inf values"
    assert ranks[0]["error"] == "the data of 1 other process(es) were refused (see their error)"
