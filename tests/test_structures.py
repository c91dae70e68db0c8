"""Leaf structures: gradients (covmodules.testing), values against dense formulas, errors."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from covmodules import (AR1Matrix, CAR1Matrix, CompoundSymmetricMatrix, DesignMatrix,
                        DiagonalMatrix, EqualEntryMatrix, EquicorrelationMatrix,
                        FactorAnalyticMatrix, FixedMatrix, IdentityMatrix, KnownMatrix,
                        LowerTriangularMatrix, ScalarMatrix, SimpleMatrix, ToeplitzMatrix,
                        UnconstrainedMatrix)
from covmodules.testing import check_gradients, random_points
from covmodules.transforms import ExpPow2, Identity

DTYPE = torch.float64


def spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=DTYPE)
    return A @ A.T + n * torch.eye(n, dtype=DTYPE)


def simple_fn(theta):
    one = torch.ones((), dtype=theta.dtype)
    return theta[0] * torch.stack([torch.stack([one, theta[1]]),
                                   torch.stack([theta[1], 1 + theta[1] ** 2])])


def simple_matrix():
    return SimpleMatrix(simple_fn, (2, 2), {"sigma^2": (0.0, ExpPow2()), "c": (0.0, Identity())})


STRUCTURES = {
    "scalar": lambda: ScalarMatrix(3),
    "ar1": lambda: AR1Matrix(4),
    "diagonal": lambda: DiagonalMatrix(4),
    "equal_entry": lambda: EqualEntryMatrix(3),
    "equal_entry_rect": lambda: EqualEntryMatrix(3, 5),
    "equicorrelation": lambda: EquicorrelationMatrix(4),
    "equicorrelation_1": lambda: EquicorrelationMatrix(1),
    "compound_symmetric": lambda: CompoundSymmetricMatrix(4),
    "car1": lambda: CAR1Matrix([0.0, 0.5, 2.0, 3.7, 3.8]),
    "toeplitz": lambda: ToeplitzMatrix(6, 2),
    "toeplitz_full": lambda: ToeplitzMatrix(4, 3),
    "unconstrained": lambda: UnconstrainedMatrix(3),
    "lower_triangular": lambda: LowerTriangularMatrix(3),
    "lower_trapezoidal": lambda: LowerTriangularMatrix(4, 2),
    "lower_trapezoidal_wide": lambda: LowerTriangularMatrix(2, 3),
    "lower_triangular_col": lambda: LowerTriangularMatrix(3, order="col"),
    "lower_trapezoidal_col": lambda: LowerTriangularMatrix(4, 2, order="col"),
    "factor_analytic": lambda: FactorAnalyticMatrix(4, 2),
    "factor_analytic_full": lambda: FactorAnalyticMatrix(3, 3),
    "known": lambda: KnownMatrix(spd(4)),
    "simple": simple_matrix,
}
PARAMETER_FREE = {
    "identity": lambda: IdentityMatrix(3),
    "fixed": lambda: FixedMatrix(torch.arange(6.0).reshape(2, 3)),
    "design": lambda: DesignMatrix(["a", "b", "a", "c"]),
}


def nat(module, free):
    return module.build_params(free)


# ------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("key", STRUCTURES)
def test_gradients(key):
    check_gradients(STRUCTURES[key]())


@pytest.mark.parametrize("key", [k for k in STRUCTURES if k != "simple"])
def test_backward_and_products_never_form_the_jacobian(key, monkeypatch):
    m = STRUCTURES[key]()

    def forbidden(nat):
        raise AssertionError("_jacobian must not be called")

    reference = m.manual_grad(random_points(m, 1)[0])[0]
    p = random_points(m, 1)[0].requires_grad_(True)
    monkeypatch.setattr(m, "_jacobian", forbidden)
    m(p).pow(2).sum().backward()
    w = torch.randn(m.shape[1], dtype=DTYPE)
    torch.testing.assert_close(m.dV(w, p.detach()), reference @ w)
    torch.testing.assert_close(p.grad, (reference * 2 * m(p.detach())).sum((1, 2)))


@pytest.mark.parametrize("key", PARAMETER_FREE)
def test_parameter_free_structures(key):
    m = PARAMETER_FREE[key]()
    rows, cols = m.shape
    assert m.num_params == 0 and list(m.parameters()) == []
    assert m.manual_grad() == (None, [])
    empty = torch.zeros(0, dtype=DTYPE)
    assert m._jacobian(empty).shape == (0, rows, cols)
    assert m.dV(torch.ones(cols, dtype=DTYPE)).shape == (0, rows)
    W = torch.ones(rows, 2, dtype=DTYPE)
    assert m._dv_matmul(empty, W, transpose=True).shape == (0, cols, 2)
    assert m._vjp(empty, torch.ones(rows, cols, dtype=DTYPE)).shape == (0,)
    assert m().shape == (rows, cols)


@pytest.mark.parametrize("key", STRUCTURES)
def test_float32_follows_dtype(key):
    m = STRUCTURES[key]()
    p = random_points(m, 1)[0]
    V64 = m(p)
    m.float()
    V32 = m(p.float())
    assert V32.dtype == torch.float32 and m().dtype == torch.float32
    torch.testing.assert_close(V32.double(), V64.detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- values
def test_scalar_and_identity_values():
    V = ScalarMatrix(3)(torch.tensor([0.5], dtype=DTYPE))
    torch.testing.assert_close(V, math.e * torch.eye(3, dtype=DTYPE))
    torch.testing.assert_close(IdentityMatrix(2)(), torch.eye(2, dtype=DTYPE))


def test_ar1_value():
    m = AR1Matrix(4)
    for p in random_points(m, 5):
        s2, rho = nat(m, p).tolist()
        expected = torch.tensor([[s2 * rho ** abs(i - j) for j in range(4)] for i in range(4)],
                                dtype=DTYPE)
        torch.testing.assert_close(m(p), expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("n", [1, 2, 7, 60])
@pytest.mark.parametrize("rho", [-0.999, -0.98, 0.0, 0.5, 0.97, 0.9999])
def test_ar1_eigh_from_its_tridiagonal_inverse_equals_dense(n, rho):
    """AR(1)'s eigendecomposition (from its tridiagonal inverse) equals LAPACK's dense one to
    1e-12 of ``‖V‖₂``, near ρ = ±1 too (there by Rayleigh quotients)."""
    m = AR1Matrix(n)
    natural = torch.tensor([2.5, rho], dtype=DTYPE)
    V = m._evaluate(natural)
    lam, Q = m._eigh(natural, V)
    dense = torch.linalg.eigvalsh(V)
    scale = float(dense.abs().max())
    torch.testing.assert_close(lam.sort().values, dense, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(Q.T @ Q, torch.eye(n, dtype=DTYPE), rtol=0, atol=1e-12)
    torch.testing.assert_close((Q * lam) @ Q.T, V, rtol=0, atol=1e-12 * scale)


def test_diagonal_value():
    m = DiagonalMatrix(3)
    p = torch.tensor([0.0, 0.5, -1.0], dtype=DTYPE)
    torch.testing.assert_close(m(p), torch.diag(torch.exp(2 * p)))
    assert m.param_names == ["sigma^2[0]", "sigma^2[1]", "sigma^2[2]"]


def test_equal_entry_value():
    V = EqualEntryMatrix(2, 3)(torch.tensor([0.5], dtype=DTYPE))
    torch.testing.assert_close(V, torch.full((2, 3), math.e, dtype=DTYPE))
    assert EqualEntryMatrix(3).shape == (3, 3)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_equicorrelation_value_and_range(n):
    m = EquicorrelationMatrix(n)
    lower = -1 / (n - 1) if n > 1 else -1.0
    x = torch.tensor([0.7], dtype=DTYPE)
    rho = lower + (1 - lower) * torch.sigmoid(x[0])
    expected = torch.tensor([[1.0 if i == j else float(rho) for j in range(n)] for i in range(n)],
                            dtype=DTYPE)
    torch.testing.assert_close(m(x), expected)
    assert m.get_param("rho") == pytest.approx((1 + lower) / 2)
    if n > 1:
        for x, limit in ((-30.0, lower), (30.0, 1.0)):
            assert float(m(torch.tensor([x], dtype=DTYPE))[0, 1]) == pytest.approx(limit, abs=1e-10)
    assert torch.linalg.eigvalsh(m(torch.tensor([-8.0], dtype=DTYPE))).min() > 0


def test_compound_symmetric_value():
    m = CompoundSymmetricMatrix(3)
    for p in random_points(m, 5):
        s2, rho = nat(m, p).tolist()
        expected = torch.tensor([[s2 if i == j else s2 * rho for j in range(3)]
                                 for i in range(3)], dtype=DTYPE)
        torch.testing.assert_close(m(p), expected)
        assert rho > -0.5


def test_car1_value_on_unequal_times():
    times = [0.0, 0.3, 1.0, 2.5, 2.6]
    m = CAR1Matrix(np.array(times))
    assert m.param_names == ["sigma^2", "phi"] and m.shape == (5, 5)
    for p in random_points(m, 5):
        s2, phi = nat(m, p).tolist()
        assert 0 < phi < 1
        expected = torch.tensor([[s2 * phi ** abs(a - b) for b in times] for a in times],
                                dtype=DTYPE)
        torch.testing.assert_close(m(p), expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(m.times, torch.tensor(times, dtype=DTYPE))
    assert "times" in m.state_dict()


def ma_covariance(n, s2, theta):
    """sigma^2 C C^T / c_0 with C the n x (n + q) map from white noise to the MA(q) series."""
    t = [1.0] + list(theta)
    q = len(theta)
    C = torch.zeros(n, n + q, dtype=DTYPE)
    for i in range(n):
        for j in range(q + 1):
            C[i, i + q - j] = t[j]
    return s2 * C @ C.T / sum(v * v for v in t)


@pytest.mark.parametrize("n, bands", [(2, 1), (5, 1), (6, 2), (5, 4)])
def test_toeplitz_matches_ma_autocovariance(n, bands):
    m = ToeplitzMatrix(n, bands)
    assert m.param_names == ["sigma^2"] + [f"theta[{k}]" for k in range(1, bands + 1)]
    torch.testing.assert_close(m(), torch.eye(n, dtype=DTYPE))
    for p in random_points(m, 5, scale=2.0):
        v = nat(m, p).tolist()
        V = m(p)
        torch.testing.assert_close(V, ma_covariance(n, v[0], v[1:]), rtol=1e-12, atol=1e-12)
        lags = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
        assert (V[lags > bands] == 0).all()
        assert torch.linalg.eigvalsh(V).min() > 0


def test_unconstrained_value_and_positive_definite():
    m = UnconstrainedMatrix(3)
    assert m.param_names == ["L[0,0]", "L[1,0]", "L[2,0]", "L[1,1]", "L[2,1]", "L[2,2]"]
    torch.testing.assert_close(m(), torch.eye(3, dtype=DTYPE))
    for p in random_points(m, 10, scale=2.0):
        L = torch.zeros(3, 3, dtype=DTYPE)
        for k, (i, j) in enumerate([(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (2, 2)]):
            L[i, j] = math.exp(p[k]) if i == j else p[k]
        V = m(p)
        torch.testing.assert_close(V, L @ L.T)
        assert torch.linalg.eigvalsh(V).min() > 0


def test_unconstrained_set_and_read_covariance():
    m = UnconstrainedMatrix(3)
    target = spd(3, seed=4)
    m.set_covariance(target.numpy())
    torch.testing.assert_close(m.covariance(), target)
    torch.testing.assert_close(m(), target)
    assert not m.covariance().requires_grad
    assert m.get_param("L[0,0]") == pytest.approx(math.sqrt(target[0, 0]))
    with pytest.raises(ValueError, match="matrix must be positive definite"):
        m.set_covariance(torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="matrix must have shape"):
        m.set_covariance(torch.eye(2))
    with pytest.raises(ValueError, match="matrix must be symmetric"):
        m.set_covariance(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(m.covariance(), target)


def test_lower_triangular_value():
    m = LowerTriangularMatrix(3, 2, order="col")
    assert m.shape == (3, 2)
    assert m.param_names == ["L[0,0]", "L[1,0]", "L[2,0]", "L[1,1]", "L[2,1]"]
    assert m.free_param_defaults.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    p = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=DTYPE)
    torch.testing.assert_close(m(p), torch.tensor([[1.0, 0.0], [2.0, 4.0], [3.0, 5.0]],
                                                  dtype=DTYPE))
    assert LowerTriangularMatrix(2, order="col").shape == (2, 2)


def test_factor_analytic_value():
    m = FactorAnalyticMatrix(4, 2)
    assert m.param_names[:7] == ["lambda[0,0]", "lambda[1,0]", "lambda[2,0]", "lambda[3,0]",
                                 "lambda[1,1]", "lambda[2,1]", "lambda[3,1]"]
    assert m.param_names[7:] == [f"psi[{i}]" for i in range(4)]
    assert m.free_param_defaults.tolist() == [1, 0, 0, 0, 1, 0, 0] + [0] * 4
    for p in random_points(m, 5):
        v = nat(m, p)
        Lam = torch.zeros(4, 2, dtype=DTYPE)
        Lam[:, 0], Lam[1:, 1] = v[:4], v[4:7]
        torch.testing.assert_close(m(p), Lam @ Lam.T + torch.diag(v[7:]))
        assert torch.linalg.eigvalsh(m(p)).min() > 0


def test_known_value():
    K = spd(3)
    m = KnownMatrix(K)
    torch.testing.assert_close(m(torch.tensor([0.5], dtype=DTYPE)), math.e * K)
    torch.testing.assert_close(m.K, K)
    assert "K" in m.state_dict()


def test_design_matrix_single_factor():
    Z = DesignMatrix(pd.Series(["b", "a", "c", "a"]))
    assert Z.levels == ["a", "b", "c"] and (Z.n, Z.q) == (4, 3)
    assert Z.codes.dtype == torch.long and Z.codes.tolist() == [1, 0, 2, 0]
    expected = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=DTYPE)
    torch.testing.assert_close(Z(), expected)
    assert "codes" in Z.state_dict()
    Z2 = DesignMatrix(np.array([3, 1, 3]), levels=[3, 2, 1])
    assert Z2.levels == [3, 2, 1]
    torch.testing.assert_close(Z2(), torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=DTYPE))
    assert DesignMatrix(torch.tensor([2, 0, 2])).levels == [0, 2]
    cat = pd.Series(["lo", "hi", "mid"], dtype=pd.CategoricalDtype(["lo", "mid", "hi"]))
    assert DesignMatrix(cat).levels == ["lo", "mid", "hi"]


def test_design_matrix_interaction():
    a = ["x", "y", "x", "y", "x"]
    b = [2, 1, 1, 1, 2]
    Z = DesignMatrix(a, b)
    assert Z.levels == [("x", 1), ("x", 2), ("y", 1)]
    assert Z.codes.tolist() == [1, 2, 0, 2, 1]
    Z = DesignMatrix(a, b, levels=[["y", "x"], None])
    assert Z.levels == [("y", 1), ("x", 1), ("x", 2)]
    Z = DesignMatrix(pd.Series(a), np.array(b), levels=[None, [2, 1]])
    assert Z.levels == [("x", 2), ("x", 1), ("y", 1)]
    expected = torch.zeros(5, 3, dtype=DTYPE)
    for i, pair in enumerate(zip(a, b)):
        expected[i, Z.levels.index(pair)] = 1
    torch.testing.assert_close(Z(), expected)


def test_design_matrix_follows_dtype_without_storing_dense():
    Z = DesignMatrix(["a", "b"])
    assert [name for name, _ in Z.named_buffers()] == ["codes"]
    assert Z._evaluate(torch.zeros(0, dtype=torch.float32)).dtype == torch.float32


def test_simple_matrix_value():
    m = simple_matrix()
    p = torch.tensor([0.5, 2.0], dtype=DTYPE)
    torch.testing.assert_close(m(p), math.e * torch.tensor([[1.0, 2.0], [2.0, 5.0]], dtype=DTYPE))
    assert m.param_names == ["sigma^2", "c"]


# --------------------------------------------------------------------------- errors
SIZED = [ScalarMatrix, AR1Matrix, DiagonalMatrix, EqualEntryMatrix, EquicorrelationMatrix,
         CompoundSymmetricMatrix, UnconstrainedMatrix, LowerTriangularMatrix, IdentityMatrix]


@pytest.mark.parametrize("cls", SIZED)
def test_bad_sizes(cls):
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        cls(0)
    with pytest.raises(TypeError, match="n must be a positive int, got float"):
        cls(2.0)
    with pytest.raises(TypeError, match="n must be a positive int"):
        cls(True)


def test_bad_second_sizes():
    with pytest.raises(ValueError, match="m must be >= 1"):
        EqualEntryMatrix(2, 0)
    with pytest.raises(ValueError, match="m must be <= n = 2, got 3"):
        LowerTriangularMatrix(2, 3, order="col")
    with pytest.raises(ValueError, match="k must be <= n = 2, got 3"):
        FactorAnalyticMatrix(2, 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        FactorAnalyticMatrix(2, 0)
    with pytest.raises(TypeError, match="k must be a positive int"):
        FactorAnalyticMatrix(2, "1")


@pytest.mark.parametrize("n, bands, error, message", [
    (3, 3, ValueError, "bands must be < n = 3, got 3"),
    (3, 0, ValueError, "bands must be >= 1"),
    (1, 1, ValueError, "bands must be < n = 1"),
    (3, 1.5, TypeError, "bands must be a positive int"),
])
def test_toeplitz_bad_bands(n, bands, error, message):
    with pytest.raises(error, match=message):
        ToeplitzMatrix(n, bands)


@pytest.mark.parametrize("K, message", [
    (torch.ones(2, 3), "K must be square"),
    (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "K must be symmetric"),
    (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "K must be positive definite"),
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "K contains NaN or inf"),
    (torch.ones(3), "K must be a 2-D matrix"),
])
def test_known_matrix_rejects(K, message):
    with pytest.raises(ValueError, match=message):
        KnownMatrix(K)


def test_car1_rejects_bad_times():
    with pytest.raises(ValueError, match="times contains NaN or inf"):
        CAR1Matrix([0.0, float("nan")])
    with pytest.raises(ValueError, match="times must be 1-D"):
        CAR1Matrix(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="times must not be empty"):
        CAR1Matrix([])


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((["a", "b"], ["x"]), {}, ValueError, r"equal lengths, got \[2, 1\]"),
    ((["a", "b", "z"],), {"levels": ["a", "b"]}, ValueError, "values not in its levels: 'z'"),
    ((["a", "b"], [1, 3]), {"levels": [None, [1, 2]]}, ValueError,
     "factor 1 has values not in its levels: 3"),
    (([1.0, float("nan")],), {}, ValueError, "missing value"),
    ((["a", None],), {}, ValueError, "missing value"),
    ((pd.Series(["a", None]),), {}, ValueError, "missing value"),
    (([],), {}, ValueError, "factor is empty"),
    ((), {}, ValueError, "at least one factor"),
    ((["a"], ["b"]), {"levels": [["a"]]}, ValueError, "list of 2 per-factor level lists"),
    ((["a", "b"],), {"levels": ["a", "b", "a"]}, ValueError, "duplicates"),
    ((["a", 1],), {}, TypeError, "give levels="),
    (("ab",), {}, TypeError, "single string"),
    ((torch.zeros(2, 2),), {}, ValueError, "factor must be 1-D"),
    ((3,), {}, TypeError, "factor must be a list"),
])
def test_design_matrix_rejects(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        DesignMatrix(*args, **kwargs)


def test_simple_matrix_rejects():
    params = {"s": (0.0, ExpPow2())}
    with pytest.raises(ValueError, match=r"fn returned shape \(2, 2\), expected \(3, 3\)"):
        SimpleMatrix(lambda t: t[0] * torch.eye(2, dtype=t.dtype), (3, 3), params)
    with pytest.raises(TypeError, match="fn must return a torch.Tensor"):
        SimpleMatrix(lambda t: 1.0, (1, 1), params)
    with pytest.raises(TypeError, match="fn must be callable"):
        SimpleMatrix(None, (1, 1), params)
    with pytest.raises(TypeError, match=r"params\['s'\] must be a \(default, Transform\) pair"):
        SimpleMatrix(lambda t: t[None], (1, 1), {"s": 0.0})
    with pytest.raises(TypeError, match="params must be a dict"):
        SimpleMatrix(lambda t: t[None], (1, 1), [("s", (0.0, ExpPow2()))])
    with pytest.raises(ValueError, match="without '/'"):
        SimpleMatrix(lambda t: t[None], (1, 1), {"a/b": (0.0, ExpPow2())})
    with pytest.raises(ValueError, match="reserved"):
        SimpleMatrix(lambda t: t[None], (1, 1), {"fn": (0.0, ExpPow2())})
    with pytest.raises(ValueError, match="shape must be a"):
        SimpleMatrix(lambda t: t[None], 3, params)
