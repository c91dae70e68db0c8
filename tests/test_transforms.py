"""Constraint transforms: inverse round trip, derivative against autograd, shapes, errors."""

import math

import pytest
import torch

from covmodules.transforms import (Chain, Exp, ExpPow2, Identity, Pow, ScaleShift, Sigmoid,
                                   Softplus, Transform, correlation)

DTYPE = torch.float64

# (transform, free-scale domain (lo, hi) on which the round trip is checked)
CASES = {
    "identity": (Identity(), (-50.0, 50.0)),
    "exp": (Exp(), (-20.0, 20.0)),
    "exp_pow2": (ExpPow2(), (-10.0, 10.0)),
    "softplus": (Softplus(), (-10.0, 20.0)),
    "sigmoid": (Sigmoid(), (-8.0, 8.0)),
    "scale_shift": (ScaleShift(-2.5, 0.75), (-50.0, 50.0)),
    "pow_half": (Pow(0.5), (1e-3, 100.0)),
    "pow_two": (Pow(2.0), (1e-3, 100.0)),
    "pow_inverse": (Pow(-1.0), (1e-3, 100.0)),
    "pow_odd": (Pow(3.0), (-10.0, 10.0)),
    "chain": (Chain(Softplus(), Pow(2.0), ScaleShift(3.0, 1.0)), (-5.0, 10.0)),
    "correlation": (correlation(), (-8.0, 8.0)),
    "correlation_lower": (correlation(-1.0 / 3.0), (-8.0, 8.0)),
    "correlation_zero": (correlation(0.0), (-8.0, 8.0)),
}


def grid(lo, hi, count=201):
    return torch.linspace(lo, hi, count, dtype=DTYPE)


@pytest.mark.parametrize("key", CASES)
def test_inverse_of_forward_is_identity(key):
    t, (lo, hi) = CASES[key]
    x = grid(lo, hi)
    torch.testing.assert_close(t.inverse(t.forward(x)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", CASES)
def test_derivative_matches_autograd(key):
    t, (lo, hi) = CASES[key]
    x = grid(lo, hi).requires_grad_(True)
    (auto,) = torch.autograd.grad(t.forward(x).sum(), x)
    torch.testing.assert_close(t.derivative(x.detach()), auto, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", CASES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (2, 3)])
def test_any_shape(key, shape):
    t, (lo, hi) = CASES[key]
    x = lo + (hi - lo) * torch.rand(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    for out in (t.forward(x), t.inverse(t.forward(x)), t.derivative(x), t(x)):
        assert out.shape == x.shape and out.dtype == DTYPE


def test_natural_ranges():
    x = grid(-30.0, 30.0)
    assert (Exp()(x) > 0).all() and (ExpPow2()(x) > 0).all() and (Softplus()(x) > 0).all()
    s = Sigmoid()(grid(-8.0, 8.0))
    assert ((s > 0) & (s < 1)).all()
    rho = correlation(-0.25)(grid(-8.0, 8.0))
    assert ((rho > -0.25) & (rho < 1)).all()


def test_known_values():
    torch.testing.assert_close(ExpPow2()(torch.tensor(0.5, dtype=DTYPE)),
                               torch.tensor(math.e, dtype=DTYPE))
    torch.testing.assert_close(correlation()(torch.tensor(1.0, dtype=DTYPE)),
                               torch.tanh(torch.tensor(0.5, dtype=DTYPE)))
    assert float(correlation(-0.5)(torch.tensor(0.0, dtype=DTYPE))) == pytest.approx(0.25)
    assert float(Softplus().inverse(torch.tensor(math.log(2.0), dtype=DTYPE))) == pytest.approx(
        0.0, abs=1e-15)


def test_equality_and_hash():
    assert correlation(-0.5) == correlation(-0.5)
    assert hash(correlation(-0.5)) == hash(correlation(-0.5))
    assert correlation(-0.5) != correlation()
    assert ExpPow2() == ExpPow2() and ExpPow2() != Exp()
    assert len({Pow(2.0), Pow(2.0), Pow(3.0)}) == 2
    assert isinstance(correlation(), Transform)


def test_repr():
    assert repr(ExpPow2()) == "ExpPow2()"
    assert repr(correlation()) == "Chain(Sigmoid(), ScaleShift(a=2, b=-1))"
    assert repr(Pow(0.5)) == "Pow(p=0.5)"


@pytest.mark.parametrize("make, message", [
    (lambda: ScaleShift(0.0, 1.0), "a != 0"),
    (lambda: ScaleShift(float("nan")), "finite a"),
    (lambda: ScaleShift(1.0, float("inf")), "finite b"),
    (lambda: Pow(0.0), "p != 0"),
    (lambda: Pow(float("inf")), "finite exponent"),
    (lambda: correlation(1.0), "lower"),
    (lambda: correlation(1.5), "lower"),
    (lambda: correlation(-1.5), "lower"),
    (lambda: correlation(float("nan")), "lower"),
])
def test_bad_constructor_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("args", [(), (1.0,), (Exp(), "exp")])
def test_chain_needs_transforms(args):
    with pytest.raises(TypeError, match="Chain needs one or more Transform instances"):
        Chain(*args)


def test_transform_is_abstract():
    with pytest.raises(TypeError):
        Transform()
