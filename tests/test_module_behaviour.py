"""Covariance modules behave as ordinary nn.Modules: parameters, buffers, dtype, copies."""

import copy

import pytest
import torch

from covmodules import (AR1Matrix, CAR1Matrix, CompoundSymmetricMatrix, DiagonalMatrix,
                        KnownMatrix, KroneckerProduct, ScalarMatrix, Sum, UnconstrainedMatrix)

DTYPE = torch.float64

BUILDERS = {
    "kronecker": lambda: KroneckerProduct(time=AR1Matrix(3), subject=ScalarMatrix(2)),
    "sum": lambda: Sum(serial=CAR1Matrix([0.0, 1.0, 2.5]), cs=CompoundSymmetricMatrix(3),
                       nugget=DiagonalMatrix(3)),
    "unconstrained": lambda: UnconstrainedMatrix(3),
    "known": lambda: KnownMatrix(torch.tensor([[2.0, 1.0], [1.0, 2.0]])),
}


@pytest.fixture(params=list(BUILDERS))
def build(request):
    return BUILDERS[request.param]


@pytest.fixture
def module(build):
    return build()


def hierarchical(name: str) -> str:
    """``named_parameters`` name -> hierarchical parameter name."""
    return name.replace(".", "/")


def free_point(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m.num_free_params, dtype=DTYPE, generator=g)


def set_free(m, values):
    with torch.no_grad():
        for i, v in zip(m.free_param_index, values):
            m._raw_tensors()[i].copy_(v)


# ------------------------------------------------------------------ parameters / buffers
def test_parameters_are_exactly_the_free_parameters(module):
    names = [hierarchical(n) for n, _ in module.named_parameters()]
    assert sorted(names) == sorted(module.free_param_names) == sorted(module.param_names)
    assert all(p.dim() == 0 and p.dtype == DTYPE for p in module.parameters())


def test_fix_and_free_move_between_parameters_and_buffers(module):
    name = module.param_names[-1]
    before = module()
    module.fix(name)
    assert name in module.fixed_param_names and name not in module.free_param_names
    assert name not in [hierarchical(n) for n, _ in module.named_parameters()]
    assert name in [hierarchical(n) for n, _ in module.named_buffers()]
    assert module.num_free_params == module.num_params - 1
    torch.testing.assert_close(module(), before)
    module.free(name)
    assert name in [hierarchical(n) for n, _ in module.named_parameters()]
    assert name not in [hierarchical(n) for n, _ in module.named_buffers()]
    assert module.fixed_param_names == []


def test_fix_at_value():
    m = KroneckerProduct(time=AR1Matrix(3), subject=ScalarMatrix(2))
    m.fix("time/rho", 0.6)
    assert m.get_param("time/rho") == pytest.approx(0.6)
    assert m.free_param_names == ["time/sigma^2", "subject/sigma^2"]
    assert m(torch.zeros(2, dtype=DTYPE))[0, 2] == pytest.approx(0.6)


def test_all_fixed_manual_grad_is_empty(module):
    for name in module.param_names:
        module.fix(name)
    assert list(module.parameters()) == []
    assert module.manual_grad() == (None, [])
    assert module.auto_grad() == (None, [])
    assert module().shape == module.shape


# ---------------------------------------------------------------------- state and copies
def test_state_dict_round_trip(module, build):
    set_free(module, free_point(module))
    module.fix(module.param_names[0])
    fresh = build()
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh(), module())
    assert fresh.params == pytest.approx(module.params)


def test_deepcopy_is_independent(module):
    clone = copy.deepcopy(module)
    torch.testing.assert_close(clone(), module())
    name = module.param_names[0]
    clone.set_param(name, 3.0)
    assert clone.get_param(name) == pytest.approx(3.0)
    assert module.get_param(name) != pytest.approx(3.0)
    assert not torch.equal(clone(), module())


@pytest.mark.parametrize("convert, dtype", [
    (lambda m: m.float(), torch.float32),
    (lambda m: m.to(torch.float32), torch.float32),
    (lambda m: m.float().double(), torch.float64),
    (lambda m: m.to(dtype=torch.float32).to(torch.float64), torch.float64),
])
def test_dtype_conversion_moves_everything(module, convert, dtype):
    module.fix(module.param_names[0])
    expected = module().detach()
    convert(module)
    assert all(p.dtype == dtype for p in module.parameters())
    assert all(b.dtype == dtype for b in module.buffers() if b.is_floating_point())
    V = module()
    assert V.dtype == dtype
    torch.testing.assert_close(V.double(), expected, rtol=1e-5, atol=1e-6)
    assert module(free_point(module).to(dtype)).dtype == dtype


def test_modules_built_alike_agree():
    for build in BUILDERS.values():
        a, b = build(), build()
        assert a.param_names == b.param_names
        assert a.free_param_names == b.free_param_names
        torch.testing.assert_close(a.param_defaults, b.param_defaults)
        torch.testing.assert_close(a(), b())


# ------------------------------------------------------------------------- training
def test_optimiser_step_matches_autograd_gradient(module):
    set_free(module, free_point(module, seed=1))
    target = torch.eye(module.shape[0], dtype=DTYPE)
    V = module()
    loss = ((V - target) ** 2).sum()
    module.zero_grad()
    loss.backward()
    J, names = module.auto_grad()
    expected = dict(zip(names, (2 * (V.detach() - target) * J).sum((1, 2))))
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, expected[hierarchical(name)], rtol=1e-10, atol=1e-12)
    optimiser = torch.optim.SGD(module.parameters(), lr=1e-3)
    optimiser.step()
    after = module()
    assert not torch.equal(after, V)
    assert float(((after.detach() - target) ** 2).sum()) < loss.item()


# --------------------------------------------------------------------- natural scale
def test_set_and_get_param_on_natural_scale():
    m = KroneckerProduct(time=AR1Matrix(3), subject=ScalarMatrix(2))
    m.set_param("subject/sigma^2", 2.5)
    assert m.get_param("subject/sigma^2") == pytest.approx(2.5, rel=1e-14)
    m.set_param("time/rho", -0.3)
    assert m.params == pytest.approx({"time/sigma^2": 1.0, "time/rho": -0.3,
                                      "subject/sigma^2": 2.5})
    for name, value in [("subject/sigma^2", -1.0), ("time/rho", 1.5), ("time/rho", -1.0)]:
        with pytest.raises(ValueError, match="outside the domain"):
            m.set_param(name, value)
    with pytest.raises(ValueError, match="unknown parameter 'time/phi'; valid names"):
        m.set_param("time/phi", 0.5)


def test_explicit_parameters_leave_registered_untouched(module):
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    default = module().detach()
    p = free_point(module, seed=2)
    V_flat = module(p)
    V_dict = module(dict(zip(module.free_param_names, p)))
    torch.testing.assert_close(V_flat, V_dict)
    assert not torch.equal(V_flat, default)
    for n, q in module.named_parameters():
        assert torch.equal(q.detach(), before[n])
    torch.testing.assert_close(module(), default)


def test_gradient_flows_to_explicit_parameters():
    m = KroneckerProduct(time=AR1Matrix(3), subject=ScalarMatrix(2))
    p = free_point(m).requires_grad_(True)
    m(p).sum().backward()
    J, _ = m.auto_grad(p.detach())
    torch.testing.assert_close(p.grad, J.sum((1, 2)))
    assert all(q.grad is None for q in m.parameters())


# --------------------------------------------------------------------------- errors
@pytest.fixture
def kron():
    return KroneckerProduct(time=AR1Matrix(3), subject=ScalarMatrix(2))


def test_wrong_flat_length(kron):
    with pytest.raises(ValueError, match="expected 3 free parameters, got 2"):
        kron(torch.zeros(2, dtype=DTYPE))


def test_dict_with_unknown_or_missing_names(kron):
    valid = r"valid free parameter names: \['time/sigma\^2', 'time/rho', 'subject/sigma\^2'\]"
    with pytest.raises(ValueError, match=r"unknown names \['bogus'\].*" + valid):
        kron({"time/sigma^2": 0.0, "time/rho": 0.0, "subject/sigma^2": 0.0, "bogus": 1.0})
    with pytest.raises(ValueError, match=r"missing names \['subject/sigma\^2'\].*" + valid):
        kron({"time/sigma^2": 0.0, "time/rho": 0.0})


@pytest.mark.parametrize("bad", [[0.0, 0.0, 0.0], (0.0, 0.0, 0.0), 1.0, "x"])
def test_non_tensor_params(kron, bad):
    with pytest.raises(TypeError, match="free_params must be a torch.Tensor or a dict"):
        kron(bad)


def test_integer_tensor_params(kron):
    with pytest.raises(TypeError, match="floating-point"):
        kron(torch.zeros(3, dtype=torch.long))


def test_two_dimensional_params(kron):
    with pytest.raises(ValueError, match=r"1-D tensor, got shape \(1, 3\)"):
        kron(torch.zeros(1, 3, dtype=DTYPE))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_params(kron, value):
    with pytest.raises(ValueError, match=r"NaN or inf for \['time/rho'\]"):
        kron(torch.tensor([0.0, value, 0.0], dtype=DTYPE))
    with pytest.raises(ValueError, match="NaN or inf"):
        kron({"time/sigma^2": 0.0, "time/rho": value, "subject/sigma^2": 0.0})


def test_nan_registered_parameters(kron):
    with torch.no_grad():
        kron.time.rho.fill_(float("nan"))
    with pytest.raises(ValueError, match="parameters contain NaN or inf"):
        kron()


def test_fix_unknown_name(kron):
    with pytest.raises(ValueError, match="unknown parameter 'rho'"):
        kron.fix("rho")
    with pytest.raises(TypeError, match="parameter name must be a str"):
        kron.free(0)


# ----------------------------------------------------------------------------- repr
def test_repr_is_readable():
    m = KroneckerProduct(time=AR1Matrix(3), subject=ScalarMatrix(2))
    m.set_param("time/rho", 0.5)
    text = repr(m)
    assert "(time): AR1Matrix(shape=(3, 3), sigma^2=1.0, rho=0.5)" in text
    assert "(subject): ScalarMatrix(shape=(2, 2), sigma^2=1.0)" in text
    assert repr(DiagonalMatrix(2)) == "DiagonalMatrix(shape=(2, 2), sigma^2[0]=1.0, sigma^2[1]=1.0)"
    assert repr(UnconstrainedMatrix(1)) == "UnconstrainedMatrix(shape=(1, 1), L[0,0]=1.0)"
