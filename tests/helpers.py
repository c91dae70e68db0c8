"""Shared checks: every covariance module must pass these against independent references."""

import torch

from covmodules import CovarianceModule

DTYPE = torch.float64


def random_points(module: CovarianceModule, count: int = 20, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(module.num_free_params, generator=g, dtype=DTYPE)
            for _ in range(count)]


def check_gradients(module: CovarianceModule, points=None, gradcheck: bool = True):
    """manual_grad == auto_grad, dV(w) == J @ w, transposed product, vjp, gradcheck."""
    points = points if points is not None else random_points(module)
    points = [module.free_param_defaults] + list(points)
    rows, cols = module.shape
    g = torch.Generator().manual_seed(1)
    for p in points:
        J, names = module.manual_grad(p)
        Ja, names_a = module.auto_grad(p)
        assert names == names_a == module.free_param_names
        assert J.shape == (module.num_free_params, rows, cols)
        assert torch.isfinite(J).all()
        torch.testing.assert_close(J, Ja, rtol=1e-10, atol=1e-10)
        w = torch.randn(cols, generator=g, dtype=DTYPE)
        torch.testing.assert_close(module.dV(w, p), J @ w, rtol=1e-10, atol=1e-10)
        W = torch.randn(cols, 3, generator=g, dtype=DTYPE)
        torch.testing.assert_close(module.dV(W, p), J @ W, rtol=1e-10, atol=1e-10)
        nat = module.build_params(p)
        Wt = torch.randn(rows, 2, generator=g, dtype=DTYPE)
        full_J = module._jacobian(nat)
        torch.testing.assert_close(module._dv_matmul(nat, Wt, transpose=True),
                                   full_J.transpose(1, 2) @ Wt, rtol=1e-10, atol=1e-10)
        G = torch.randn(rows, cols, generator=g, dtype=DTYPE)
        torch.testing.assert_close(module._vjp(nat, G), torch.einsum("kij,ij->k", full_J, G),
                                   rtol=1e-10, atol=1e-10)
    if gradcheck:
        for p in points[:3]:
            x = p.clone().requires_grad_(True)
            assert torch.autograd.gradcheck(lambda f: module(f), (x,), eps=1e-6, atol=1e-6)
