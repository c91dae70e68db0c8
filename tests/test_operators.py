"""Container modules: values against dense constructions, closed-form gradients, naming, errors."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from covmodules import (AR1Matrix, Augment, BlockDiagonal, CovarianceModule,
                        CovariancePropagation, DesignMatrix, Gram, Grouped, HadamardProduct,
                        KroneckerProduct, Operator, ScalarMatrix, Sum, UnconstrainedMatrix)
from covmodules.testing import check_gradients, random_points

DTYPE = torch.float64

gen = torch.Generator().manual_seed(123)


def randn(*shape):
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def split(p, *modules):
    sizes = [m.num_free_params for m in modules]
    return torch.split(p, sizes)


def check_tree(module, reference, count=4, gradcheck=True):
    """Value equals ``reference(p)`` at random points; closed-form gradients pass."""
    points = random_points(module, count=count)
    for p in [module.free_param_defaults] + points:
        torch.testing.assert_close(module(p), reference(p), rtol=1e-12, atol=1e-12)
    check_gradients(module, points, gradcheck=gradcheck)


# ------------------------------------------------------------------------------ trees
@pytest.mark.parametrize("rows, cols", [(6, 5), (3, 2)])
def test_field_trial_tree(rows, cols):
    row, col, nugget = AR1Matrix(rows), AR1Matrix(cols), ScalarMatrix(rows * cols)
    V = Sum(field=KroneckerProduct(row=row, col=col), nugget=nugget)
    assert V.free_param_names == ["field/row/sigma^2", "field/row/rho", "field/col/sigma^2",
                                  "field/col/rho", "nugget/sigma^2"]

    def reference(p):
        a, b, c = split(p, row, col, nugget)
        return torch.kron(row(a), col(b)) + nugget(c)

    small = rows * cols <= 6
    check_tree(V, reference, count=4 if small else 2, gradcheck=small)
    if not small:   # 900 outputs: gradcheck's fast mode (random projections of the Jacobian)
        for p in random_points(V, count=3):
            x = p.clone().requires_grad_(True)
            assert torch.autograd.gradcheck(V, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_propagation_of_block_diagonal_g():
    n = 8
    Z = randn(n, 5)
    us, sc, e = UnconstrainedMatrix(2), ScalarMatrix(3), ScalarMatrix(n)
    V = Sum(CovariancePropagation(Z, BlockDiagonal(us, sc)), e)
    assert V.free_param_names[:2] == ["0/1/0/L[0,0]", "0/1/0/L[1,0]"]

    def reference(p):
        a, b, c = split(p, us, sc, e)
        return Z @ torch.block_diag(us(a), sc(b)) @ Z.T + e(c)

    check_tree(V, reference)


def test_propagation_through_design_matrix():
    subject = ["s2", "s1", "s2", "s3", "s1", "s3", "s3"]
    Z = DesignMatrix(subject)
    G = ScalarMatrix(3)
    V = CovariancePropagation(Z=Z, subject=G)
    assert V.free_param_names == ["subject/sigma^2"]
    one_hot = torch.tensor([[1.0 if s == lv else 0.0 for lv in ["s1", "s2", "s3"]]
                            for s in subject], dtype=DTYPE)
    check_tree(V, lambda p: one_hot @ G(p) @ one_hot.T)


def test_propagation_with_parametrised_z_and_nonsymmetric_g():
    # Z = [X, AR1] has parameters; G = AR1 ∘ M with M not symmetric exercises transposes
    X, M = randn(6, 2), randn(3, 3)
    ar_z, ar_g = AR1Matrix(6), AR1Matrix(3)
    Z = Augment(x=X, serial=ar_z)
    G = BlockDiagonal(ScalarMatrix(5), HadamardProduct(ar_g, M))
    sc = G.operand_modules[0]
    V = CovariancePropagation(Z=Z, G=G)

    def reference(p):
        a, b, c = split(p, ar_z, sc, ar_g)
        Zv = torch.cat([X, ar_z(a)], dim=1)
        return Zv @ torch.block_diag(sc(b), ar_g(c) * M) @ Zv.T

    check_tree(V, reference)


def test_hadamard_products():
    K = randn(5, 5)
    K = K @ K.T + 5 * torch.eye(5, dtype=DTYPE)
    a, b = AR1Matrix(5), UnconstrainedMatrix(5)
    V = HadamardProduct(a, b)
    check_tree(V, lambda p: a(split(p, a, b)[0]) * b(split(p, a, b)[1]))

    scale, e = ScalarMatrix(1), ScalarMatrix(5)
    V = Sum(genetic=HadamardProduct(scale=scale, K=K), e=e)
    assert V.free_param_names == ["genetic/scale/sigma^2", "e/sigma^2"]
    check_tree(V, lambda p: scale(p[:1]) * K + e(p[1:]))

    ar = AR1Matrix(3)
    V = HadamardProduct(ar, torch.tensor(2.5, dtype=DTYPE))      # 0-d tensor broadcasts
    assert V.shape == (3, 3)
    check_tree(V, lambda p: 2.5 * ar(p))

    s1, s2 = ScalarMatrix(1), ScalarMatrix(1)
    check_tree(HadamardProduct(s1, s2), lambda p: s1(p[:1]) * s2(p[1:]))


def test_hadamard_of_rectangular_operators():
    X = randn(4, 2)
    ar, scale = AR1Matrix(4), ScalarMatrix(1)
    A = Augment(ar, X)
    V = HadamardProduct(A, HadamardProduct(scale, randn(4, 6) + 3))
    M = V.operand_modules[1].operand_modules[1].value

    def reference(p):
        a, b = split(p, ar, scale)
        return torch.cat([ar(a), X], dim=1) * scale(b) * M

    check_tree(V, reference)


@pytest.mark.parametrize("form", ["XXt", "XtX"])
def test_gram_trees(form):
    X = randn(5, 2)
    ar, e = AR1Matrix(5), ScalarMatrix(5 if form == "XXt" else 7)
    V = Sum(lowrank=Gram(Augment(x=X, ar=ar), form=form), e=e)
    assert V.free_param_names == ["lowrank/0/ar/sigma^2", "lowrank/0/ar/rho", "e/sigma^2"]

    def reference(p):
        a, b = split(p, ar, e)
        F = torch.cat([X, ar(a)], dim=1)
        return (F @ F.T if form == "XXt" else F.T @ F) + e(b)

    check_tree(V, reference)
    assert Gram(X, form=form)().shape == ((5, 5) if form == "XXt" else (2, 2))


def test_augment():
    X = randn(4, 2)
    ar, sc = AR1Matrix(4), ScalarMatrix(4)
    V = Augment(ar, X, sc)
    assert V.shape == (4, 10)

    def reference(p):
        a, b = split(p, ar, sc)
        return torch.cat([ar(a), X, sc(b)], dim=1)

    check_tree(V, reference)


def test_block_diagonal_rectangular_blocks():
    ar, sc = AR1Matrix(3), ScalarMatrix(2)
    X, Y = randn(3, 1), randn(1, 3)
    V = BlockDiagonal(Augment(ar, X), sc, Y)
    assert V.shape == (6, 9)

    def reference(p):
        a, b = split(p, ar, sc)
        return torch.block_diag(torch.cat([ar(a), X], dim=1), sc(b), Y)

    check_tree(V, reference)


def grouped_reference(S, groups, positions):
    n = len(groups)
    V = torch.zeros(n, n, dtype=S.dtype)
    for i in range(n):
        for j in range(n):
            if groups[i] == groups[j]:
                V[i, j] = S[positions[i], positions[j]]
    return V


def test_grouped_unequal_sizes_shuffled_rows_and_gaps():
    groups = [3, 1, 3, 2, 1, 3, 2, 1, 1, 7]
    positions = [4, 0, 0, 2, 3, 1, 0, 1, 4, 2]          # position 3 of groups 2/3 unused
    ar = AR1Matrix(5)
    V = Grouped(time=ar, groups=groups, positions=positions)
    assert V.free_param_names == ["time/sigma^2", "time/rho"]
    assert V.num_groups == 4 and V.shape == (10, 10)
    assert V.group_codes.tolist() == [2, 0, 2, 1, 0, 2, 1, 0, 0, 3]
    assert V.positions.tolist() == positions
    check_tree(V, lambda p: grouped_reference(ar(p), groups, positions))


def test_grouped_nonsymmetric_and_unstructured_structures():
    groups = ["b", "a", "a", "c", "b", "a"]
    positions = [1, 2, 0, 0, 2, 1]
    ar, M = AR1Matrix(3), randn(3, 3)
    V = Grouped(HadamardProduct(ar, M), groups, positions)   # (structure, groups, positions)
    check_tree(V, lambda p: grouped_reference(ar(p) * M, groups, positions))
    us = UnconstrainedMatrix(3)
    V = Sum(res=Grouped(subject=us, groups=groups, positions=positions), e=ScalarMatrix(6))
    e = V.operand_modules[1]
    check_tree(V, lambda p: grouped_reference(us(p[:6]), groups, positions) + e(p[6:]))


def test_grouped_random_unbalanced_layout():
    rng = np.random.default_rng(5)
    groups = rng.choice(["big", "a", "b", "c", "d", "e", "f"], size=30,
                        p=[0.5] + [0.5 / 6] * 6)
    positions = rng.integers(0, 6, size=30)                     # repeats allowed
    us = UnconstrainedMatrix(6)
    V = Grouped(us, groups=pd.Series(groups), positions=torch.from_numpy(positions))
    check_tree(V, lambda p: grouped_reference(us(p), groups, positions), count=2)


def test_grouped_default_positions_follow_row_order():
    groups = ["m2", "m1", "m2", "m1", "m1", "m3"]
    ar = AR1Matrix(3)
    V = Grouped(ar, groups=groups)
    assert V.positions.tolist() == [0, 0, 1, 1, 2, 0]
    p = torch.tensor([0.3, 0.8], dtype=DTYPE)
    torch.testing.assert_close(V(p), grouped_reference(ar(p), groups, [0, 0, 1, 1, 2, 0]))


@pytest.mark.parametrize("labels", [
    [10, 20, 10, 30], ["x", "y", "x", "z"], np.array([10, 20, 10, 30]),
    torch.tensor([10, 20, 10, 30]), pd.Series(["x", "y", "x", "z"]),
    pd.Categorical(["x", "y", "x", "z"])])
def test_grouped_label_types(labels):
    V = Grouped(AR1Matrix(2), groups=labels)
    assert V.group_codes.tolist() == [0, 1, 0, 2]
    assert V.positions.tolist() == [0, 0, 1, 0]


def test_grouped_buffers_move_and_stay_out_of_state_dict():
    a = Grouped(AR1Matrix(3), groups=[1, 1, 2], positions=[0, 2, 1])
    b = Grouped(AR1Matrix(3), groups=[5, 6, 6, 6], positions=[0, 0, 1, 2])
    assert {"group_codes", "positions"} <= set(dict(a.named_buffers()))
    assert list(a.state_dict()) == ["0.sigma^2", "0.rho"]
    a.set_param("0/rho", 0.4)
    b.load_state_dict(a.state_dict())                       # same structure, other data
    assert b.get_param("0/rho") == pytest.approx(0.4)
    assert a.to(torch.float32)().dtype == torch.float32
    assert a.group_codes.dtype == torch.long


def test_three_level_nesting():
    inner = Sum(c=ScalarMatrix(2), d=AR1Matrix(2))
    V = Sum(a=KroneckerProduct(b=inner, t=AR1Matrix(3)), e=ScalarMatrix(6))
    assert V.free_param_names == ["a/b/c/sigma^2", "a/b/d/sigma^2", "a/b/d/rho",
                                  "a/t/sigma^2", "a/t/rho", "e/sigma^2"]
    c, d = inner.operand_modules
    t, e = V.operand_modules[0].operand_modules[1], V.operand_modules[1]

    def reference(p):
        pc, pd_, pt, pe = split(p, c, d, t, e)
        return torch.kron(c(pc) + d(pd_), t(pt)) + e(pe)

    check_tree(V, reference)
    V.set_param("a/b/d/rho", 0.3)
    assert inner.get_param("d/rho") == pytest.approx(0.3)


def test_registered_backward_matches_autograd():
    n = 12
    Z = randn(n, 4)
    V = Sum(u=CovariancePropagation(Z, UnconstrainedMatrix(4)),
            r=Grouped(AR1Matrix(4), groups=[i % 3 for i in range(n)]),
            k=HadamardProduct(ScalarMatrix(1), torch.eye(n, dtype=DTYPE) + 0.5),
            e=ScalarMatrix(n))
    with torch.no_grad():
        for p in V.parameters():
            p.copy_(0.3 * torch.randn((), generator=gen, dtype=DTYPE))
    C = randn(n, n)
    (V() * C).sum().backward()
    free = V._registered_free().detach().requires_grad_(True)
    (V._evaluate(V._natural(V._full_raw(free))) * C).sum().backward()
    torch.testing.assert_close(torch.stack([p.grad for p in V.parameters()]), free.grad,
                               rtol=1e-10, atol=1e-10)


def test_backward_and_products_never_form_an_operator_jacobian(monkeypatch):
    def refuse(self, nat):
        raise AssertionError(f"{type(self).__name__}._jacobian called")

    n = 12
    trees = [
        Sum(field=KroneckerProduct(row=AR1Matrix(4), col=AR1Matrix(3)), nugget=ScalarMatrix(n)),
        Sum(CovariancePropagation(Augment(randn(n, 2), AR1Matrix(n)), BlockDiagonal(
            UnconstrainedMatrix(2), ScalarMatrix(n))), ScalarMatrix(n)),
        Gram(Augment(randn(n, 2), AR1Matrix(n)), form="XtX"),
        Grouped(KroneckerProduct(AR1Matrix(2), AR1Matrix(2)), groups=[i % 3 for i in range(n)]),
        HadamardProduct(ScalarMatrix(1), Sum(AR1Matrix(n), ScalarMatrix(n))),
    ]
    monkeypatch.setattr(Operator, "_jacobian", refuse)
    for V in trees:
        nat = V.build_params()
        rows, cols = V.shape
        assert V._vjp(nat, randn(rows, cols)).shape == (V.num_params,)
        assert V._dv_matmul(nat, randn(cols, 2)).shape == (V.num_params, rows, 2)
        assert V._dv_matmul(nat, randn(rows, 2), True).shape == (V.num_params, cols, 2)
        V().sum().backward()


# ----------------------------------------------------------------------------- naming
def test_operand_naming_styles():
    kw = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(2))
    as_dict = KroneckerProduct({"time": AR1Matrix(2), "subject": ScalarMatrix(2)})
    positional = KroneckerProduct(AR1Matrix(2), ScalarMatrix(2))
    assert kw.free_param_names == as_dict.free_param_names == [
        "time/sigma^2", "time/rho", "subject/sigma^2"]
    assert positional.free_param_names == ["0/sigma^2", "0/rho", "1/sigma^2"]
    p = torch.tensor([1.0, 1.0, 1.0])
    torch.testing.assert_close(kw(p), positional(p))
    assert list(kw.operands) == ["time", "subject"]
    X = torch.ones(3, 2)
    assert torch.equal(Augment(x=X, ar=AR1Matrix(3)).operands["x"], X)
    assert list(Augment(x=X, ar=AR1Matrix(3)).state_dict()) == ["x.value", "ar.sigma^2",
                                                                  "ar.rho"]


def test_fix_and_free_through_operators():
    V = Sum(field=KroneckerProduct(row=AR1Matrix(4), col=AR1Matrix(3)), nugget=ScalarMatrix(12))
    V.fix("field/row/rho", 0.5)
    assert "field/row/rho" not in V.free_param_names
    assert V.fixed_param_names == ["field/row/rho"]
    assert V.get_param("field/row/rho") == pytest.approx(0.5)
    assert "field.row.rho" not in dict(V.named_parameters())
    row = V.operand_modules[0].operand_modules[0]
    assert row.fixed_param_names == ["rho"]
    torch.testing.assert_close(V()[0, 9], torch.tensor(0.5 ** 3, dtype=DTYPE))
    check_gradients(V, random_points(V, count=3))
    V.free("field/row/rho")
    assert V.num_free_params == 5 and V.get_param("field/row/rho") == pytest.approx(0.5)


def test_build_operands_and_operands_grad():
    V = CovariancePropagation(Z=torch.eye(3, dtype=DTYPE), G=AR1Matrix(3))
    p = torch.tensor([0.2, -0.4], dtype=DTYPE)
    ops = V.build_operands(p)
    torch.testing.assert_close(ops["G"], AR1Matrix(3)(p))
    grads = V.operands_grad(p)
    assert grads["Z"] == (None, [])
    assert grads["G"][1] == ["sigma^2", "rho"]


# ----------------------------------------------------------------------------- errors
FIXED_COUNT = {"KroneckerProduct", "HadamardProduct", "CovariancePropagation", "Gram", "Grouped"}
OPERATORS = {
    "Sum": (Sum, lambda: [AR1Matrix(3), ScalarMatrix(3)]),
    "KroneckerProduct": (KroneckerProduct, lambda: [AR1Matrix(2), ScalarMatrix(2)]),
    "BlockDiagonal": (BlockDiagonal, lambda: [AR1Matrix(2), ScalarMatrix(3)]),
    "HadamardProduct": (HadamardProduct, lambda: [AR1Matrix(3), ScalarMatrix(3)]),
    "CovariancePropagation": (CovariancePropagation, lambda: [torch.ones(4, 3), AR1Matrix(3)]),
    "Gram": (Gram, lambda: [AR1Matrix(3)]),
    "Augment": (Augment, lambda: [AR1Matrix(3), torch.ones(3, 2)]),
    "Grouped": (lambda *a, **k: Grouped(*a, groups=[0, 0, 1], **k), lambda: [AR1Matrix(2)]),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_valid_operands_build(name):
    cls, operands = OPERATORS[name]
    assert isinstance(cls(*operands()), CovarianceModule)


@pytest.mark.parametrize("name", OPERATORS)
def test_wrong_operand_count(name):
    cls, operands = OPERATORS[name]
    ops = operands()
    if name in FIXED_COUNT:
        with pytest.raises(ValueError, match=f"needs exactly {len(ops)} operands, got 3"):
            cls(*ops, *[copy.deepcopy(op) for op in ops * 3][:3 - len(ops)])
    if len(ops) > 1:
        with pytest.raises(ValueError, match="operands, got 1"):
            cls(ops[0])
    else:
        with pytest.raises(ValueError, match="operands, got 0"):
            cls()


@pytest.mark.parametrize("name", OPERATORS)
def test_operand_of_wrong_type(name):
    cls, operands = OPERATORS[name]
    ops = operands()
    with pytest.raises(TypeError, match="must be a CovarianceModule or a tensor"):
        cls(*ops[:-1], "not a matrix")


@pytest.mark.parametrize("name", OPERATORS)
def test_bad_operand_names(name):
    cls, operands = OPERATORS[name]
    named = dict(zip(["a/b", "c"], operands()))
    with pytest.raises(ValueError, match="must not contain '/'"):
        cls(named)
    reserved = dict(zip(["forward", "c"], operands()))
    with pytest.raises(ValueError, match="duplicate or reserved operand name 'forward'"):
        cls(reserved)


@pytest.mark.parametrize("name", [n for n in OPERATORS if n not in ("Gram", "Grouped")])
def test_shared_operand_instance(name):
    cls, operands = OPERATORS[name]
    ops = operands()
    shared = ops[0] if isinstance(ops[0], CovarianceModule) else ops[1]
    with pytest.raises(ValueError, match="shares parameters with another operand"):
        cls(shared, Sum(copy.deepcopy(shared), shared))


@pytest.mark.parametrize("build, message", [
    (lambda: Sum(AR1Matrix(3), ScalarMatrix(4)), "equal shapes"),
    (lambda: HadamardProduct(AR1Matrix(3), ScalarMatrix(4)), "equal shapes"),
    (lambda: HadamardProduct(AR1Matrix(3), torch.ones(3)), "2-D"),
    (lambda: Augment(AR1Matrix(3), torch.ones(4, 2)), "equal row counts"),
    (lambda: CovariancePropagation(torch.ones(5, 4), AR1Matrix(3)), "Z has 4 columns but G"),
    (lambda: CovariancePropagation(torch.ones(5, 3), torch.ones(3, 2)), "G must be square"),
    (lambda: Grouped(torch.ones(3, 2), groups=[0, 1]), "square structure"),
])
def test_shape_mismatch(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_block_diagonal_accepts_any_shapes():
    V = BlockDiagonal(torch.ones(1, 3), AR1Matrix(2), torch.ones(4, 1))
    assert V.shape == (7, 6)


def test_gram_rejects_unknown_form():
    with pytest.raises(ValueError, match="form must be one of"):
        Gram(AR1Matrix(2), form="XX")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(groups=[0, 0, 1], positions=[0, 3, 0]), ValueError, r"positions must lie in 0\.\.2"),
    (dict(groups=[0, 0, 1], positions=[0, -1, 0]), ValueError, r"positions must lie in 0\.\.2"),
    (dict(groups=[0, 0, 1], positions=[0, 1]), ValueError, "one entry per row"),
    (dict(groups=[0, 0, 0, 0]), ValueError, "a group has 4 rows but the structure is 3 x 3"),
    (dict(groups=[0, 0, 1], positions=[0, 1.5, 0]), ValueError, "whole numbers"),
    (dict(groups=[0, 0, 1], positions=["a", "b", "c"]), TypeError, "integers"),
    (dict(groups=[[0, 1], [1, 0]]), ValueError, "1-D"),
    (dict(groups=[]), ValueError, "at least one row"),
    (dict(groups=[1.0, float("nan"), 1.0]), ValueError, "missing values"),
    (dict(), TypeError, "needs groups"),
])
def test_grouped_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        Grouped(AR1Matrix(3), **kwargs)
