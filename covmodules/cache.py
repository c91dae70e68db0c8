"""The intermediate cache of a covariance module: values computed at one parameter vector,
kept for the next call at the same vector (an operator's forward and backward passes share
its operands' matrices this way).

An entry is keyed by a fingerprint of the parameter values (dtype, device and a hash of the
bytes), so any other vector misses. Nothing is cached or returned for parameters that carry a
graph (autograd paths) or are traced by ``torch.func``; moving the module (``.to()``,
``.double()``) clears the cache.

Example::

    >>> import torch
    >>> from covmodules import AR1Matrix
    >>> m, p = AR1Matrix(2), torch.zeros(2)
    >>> m.set_intermediates(p, "values at p")
    >>> m.get_intermediates(p.clone()), m.get_intermediates(p + 1)
    ('values at p', None)
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["IntermediateCache"]


class IntermediateCache:
    """Mixin for ``nn.Module``: one cached entry of intermediates per module (see the module
    docstring)."""

    def get_intermediates(self, params: torch.Tensor):
        """Cached intermediates for ``params`` if still valid, else ``None``."""
        if not _cacheable(params):
            return None
        cache = self.__dict__.get("_intermediates")
        if cache is not None and cache[0] == _fingerprint(params):
            return cache[1]
        return None

    def set_intermediates(self, params: torch.Tensor, intermediates) -> None:
        """Cache ``intermediates`` computed at ``params``."""
        if _cacheable(params):
            self.__dict__["_intermediates"] = (_fingerprint(params), intermediates)

    def reset_intermediates(self) -> None:
        """Clear the intermediate cache."""
        self.__dict__.pop("_intermediates", None)

    def _apply(self, fn, *args, **kwargs):
        self.reset_intermediates()
        return super()._apply(fn, *args, **kwargs)


def _cacheable(params: torch.Tensor) -> bool:
    """Whether ``params`` is a plain tensor without a graph (not a ``torch.func`` wrapper)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor(params)
    return not params.requires_grad and not wrapped


def _fingerprint(params: torch.Tensor):
    data = params.detach().cpu().contiguous().numpy().tobytes()
    return (params.dtype, params.device, hashlib.blake2b(data, digest_size=16).digest())
