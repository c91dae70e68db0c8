"""The seed document's printed examples are exact acceptance values."""

import torch

from covmodules import AR1Matrix, KroneckerProduct, ScalarMatrix

SEED_VALUE = """tensor([[54.5982,  0.0000, 25.2307,  0.0000],
        [ 0.0000, 54.5982,  0.0000, 25.2307],
        [25.2307,  0.0000, 54.5982,  0.0000],
        [ 0.0000, 25.2307,  0.0000, 54.5982]])"""

SEED_GRAD = """tensor([[[109.1963,   0.0000,  50.4615,   0.0000],
         [  0.0000, 109.1963,   0.0000,  50.4615],
         [ 50.4615,   0.0000, 109.1963,   0.0000],
         [  0.0000,  50.4615,   0.0000, 109.1963]],

        [[  0.0000,   0.0000,  21.4693,   0.0000],
         [  0.0000,   0.0000,   0.0000,  21.4693],
         [ 21.4693,   0.0000,   0.0000,   0.0000],
         [  0.0000,  21.4693,   0.0000,   0.0000]],

        [[109.1963,   0.0000,  50.4615,   0.0000],
         [  0.0000, 109.1963,   0.0000,  50.4615],
         [ 50.4615,   0.0000, 109.1963,   0.0000],
         [  0.0000,  50.4615,   0.0000, 109.1963]]])"""


def seed_operator():
    return KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(2))


def test_seed_value_prints_exactly():
    op = seed_operator()
    assert str(op(torch.tensor([1.0, 1.0, 1.0]))) == SEED_VALUE


def test_seed_manual_grad_prints_exactly():
    grad, names = seed_operator().manual_grad(torch.tensor([1.0, 1.0, 1.0]))
    assert str(grad) == SEED_GRAD
    assert names == ["time/sigma^2", "time/rho", "subject/sigma^2"]


def test_ar1_value_at_one_one():
    V = AR1Matrix(2)(torch.tensor([1.0, 1.0], dtype=torch.float64))
    e2 = torch.exp(torch.tensor(2.0, dtype=torch.float64))
    expected = torch.stack([torch.stack([e2, e2 * torch.tanh(torch.tensor(0.5, dtype=torch.float64))]),
                            torch.stack([e2 * torch.tanh(torch.tensor(0.5, dtype=torch.float64)), e2])])
    torch.testing.assert_close(V, expected, rtol=1e-15, atol=0)


def test_seed_operator_rejects_wrong_operand_count():
    import pytest
    with pytest.raises(ValueError, match="exactly 2 operands, got 3"):
        KroneckerProduct(AR1Matrix(2), AR1Matrix(2), AR1Matrix(2))
