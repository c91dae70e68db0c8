"""Argument checks shared by the library: each raises a clear error naming the argument."""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["check_size", "as_matrix", "as_vector", "as_data"]


def check_size(value, name: str) -> int:
    """A positive integer size."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _as_float_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, (np.ndarray, list, tuple)) or hasattr(value, "to_numpy"):
        arr = np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.float64))
    else:
        raise TypeError(f"{name} must be a tensor or array, got {type(value).__name__}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.bool,
                                                  torch.int16, torch.uint8)):
        raise TypeError(f"{name} must be a real tensor, got {t.dtype}")
    t = t if t.is_floating_point() else t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def as_matrix(value, name: str, square: bool = False, symmetric: bool = False,
              positive_definite: bool = False) -> torch.Tensor:
    """A finite real 2-D tensor, optionally square / symmetric / positive definite."""
    t = _as_float_tensor(value, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(t.shape)}")
    if (square or symmetric or positive_definite) and t.shape[0] != t.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(t.shape)}")
    if symmetric or positive_definite:
        tol = 1e-10 * max(1.0, float(t.abs().max()))
        if not torch.allclose(t, t.T, rtol=0.0, atol=tol):
            raise ValueError(f"{name} must be symmetric")
    if positive_definite and torch.linalg.cholesky_ex(t.to(torch.float64)).info != 0:
        raise ValueError(f"{name} must be positive definite (its Cholesky factorisation failed)")
    return t


def as_vector(value, name: str, length: int | None = None) -> torch.Tensor:
    """A finite real 1-D tensor, optionally of a given length."""
    t = _as_float_tensor(value, name)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} must have length {length}, got {t.numel()}")
    return t


def as_data(value, name: str, dim: int, device=None) -> torch.Tensor:
    """Data (``y``, ``X``, a network's output) as a finite float64 tensor with ``dim``
    dimensions, on ``device`` when given, the autograd graph kept. A vector may come as
    ``(n, 1)``; integers are converted, complex and boolean tensors refused.

    >>> as_data(torch.tensor([[1], [2]]), "y", 1)
    tensor([1., 2.], dtype=torch.float64)
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers (a floating-point or integer tensor), "
                        f"got {value.dtype}")
    if dim == 1 and value.dim() == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.dim() != dim:
        shape = "(n,) or (n, 1)" if dim == 1 else "(n, p)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or inf values")
    return value.to(device=device, dtype=torch.float64)
