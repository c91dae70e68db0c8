"""Structured products V @ W and block designs equal their dense references."""

import pytest
import torch

from covmodules import (AR1Matrix, BlockDesignMatrix, CompoundSymmetricMatrix, DesignMatrix,
                        IdentityMatrix, KroneckerProduct, MixedModel, ScalarMatrix, Sum,
                        UnconstrainedMatrix)
from covmodules.testing import check_gradients

DT = torch.float64


@pytest.mark.parametrize("module", [
    ScalarMatrix(4), IdentityMatrix(3), AR1Matrix(5),
    KroneckerProduct(levels=IdentityMatrix(4), terms=UnconstrainedMatrix(2)),
    Sum(field=KroneckerProduct(row=AR1Matrix(3), col=CompoundSymmetricMatrix(4)),
        nugget=ScalarMatrix(12)),
    KroneckerProduct(AR1Matrix(2), torch.randn(3, 4, dtype=DT)),
])
def test_matmul_equals_dense(module):
    g = torch.Generator().manual_seed(0)
    free = torch.randn(module.num_free_params, generator=g, dtype=DT)
    W = torch.randn(module.shape[1], 3, generator=g, dtype=DT)
    torch.testing.assert_close(module.matmul(W, free), module(free).detach() @ W,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.matmul(W[:, 0], free), module(free).detach() @ W[:, 0],
                               rtol=1e-12, atol=1e-12)


def test_block_design_products_and_errors():
    g = torch.Generator().manual_seed(1)
    codes = torch.tensor([2, 0, 0, 1, 2, 1])
    values = torch.randn(6, 3, generator=g, dtype=DT)
    Z = BlockDesignMatrix(codes, values, 3)
    dense = torch.zeros(6, 9, dtype=DT)
    for i, c in enumerate(codes.tolist()):
        dense[i, 3 * c:3 * c + 3] = values[i]
    torch.testing.assert_close(Z(), dense)
    W = torch.randn(9, 2, generator=g, dtype=DT)
    torch.testing.assert_close(Z.product(W), dense @ W)
    torch.testing.assert_close(Z.matmul(W), dense @ W)
    R = torch.randn(6, 2, generator=g, dtype=DT)
    torch.testing.assert_close(Z.transposed_product(R), dense.T @ R)
    with pytest.raises(ValueError, match="codes must lie in"):
        BlockDesignMatrix(torch.tensor([0, 3]), torch.ones(2, 1), 3)
    with pytest.raises(ValueError, match="values must have shape"):
        BlockDesignMatrix(torch.tensor([0, 1]), torch.ones(3, 1), 2)
    with pytest.raises(ValueError, match="NaN"):
        BlockDesignMatrix(torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]), 2)


def test_mixed_model_with_block_designs_equals_dense_z():
    g = torch.Generator().manual_seed(2)
    n, L = 12, 4
    codes = torch.arange(n) % L
    values = torch.stack([torch.ones(n, dtype=DT), torch.randn(n, generator=g, dtype=DT)], 1)
    block = BlockDesignMatrix(codes, values, L)
    site = DesignMatrix([0, 1, 2] * 4)

    def build(Z1, Z2):
        return MixedModel(
            random={"subject": (Z1, KroneckerProduct(levels=IdentityMatrix(L),
                                                     terms=UnconstrainedMatrix(2))),
                    "site": (Z2, ScalarMatrix(3))},
            residual=ScalarMatrix(n))

    structured, dense = build(block, site), build(block(), site())
    assert isinstance(structured.designs["site"], BlockDesignMatrix)
    free = torch.randn(structured.num_free_params, generator=g, dtype=DT)
    torch.testing.assert_close(structured(free), dense(free), rtol=1e-12, atol=1e-12)
    check_gradients(structured, gradcheck=False)
