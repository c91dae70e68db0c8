r"""A covariance structure given by a user function of its natural-scale parameters.

.. math:: \mathbf{V} = f(\boldsymbol{\theta}), \qquad
          \theta_k = \tau_k(x_k) \ \text{(each parameter's constraint transform)}.

Derivatives come from autograd on ``fn``: the vector-Jacobian product
:math:`[\langle \mathbf{G}, \partial \mathbf{V} / \partial \theta_k \rangle]_k` by one
reverse-mode pass, the Jacobian by differentiating that product :math:`\mathbf{J}^\top
\mathbf{u}` with respect to the cotangent :math:`\mathbf{u}` (one pass per parameter, so
``fn`` must be twice differentiable by autograd). Use it for quick experiments; a dedicated
structure with closed-form derivatives is faster.

torch-openreml's form ``SimpleMatrix(num_free_params, call, manual_grad=None, default=0.0)``
works too: parameters ``theta_0``, ... (identity transform, all at ``default``), ``call(theta)``
returns the matrix and ``manual_grad(theta)``, when given, its ``(J, names)``, used in place of
autograd; as upstream, both receive the *free* parameters only.
"""

import numbers
from collections.abc import Mapping

import torch

from ..base import Structure
from ..param import simple_param_specs, spec_tuples
from ..transforms import Transform
from ..validation import check_size


class SimpleMatrix(Structure):
    r"""The matrix ``fn(theta)`` of shape ``shape`` for natural-scale parameters ``theta``
    (``SimpleMatrix(fn, shape, params)``), or torch-openreml's
    ``SimpleMatrix(num_free_params, call, manual_grad=None, default=0.0)`` (module docstring).

    ``params`` maps each name, in order, to ``(default free value, Transform)`` or
    ``(default, Transform, role)`` (a :class:`~covmodules.ParamSpec` role such as
    ``"loading"``; inferred from the transform when omitted); ``fn``
    receives the 1-D tensor of natural-scale values in that order and must return a tensor of
    shape ``shape`` (build constants in ``theta.dtype`` to keep float64 precision).

    Example::

        >>> import torch
        >>> from covmodules import SimpleMatrix
        >>> from covmodules.transforms import ExpPow2, Identity
        >>> def fn(theta):                         # sigma^2 [[1, c], [c, 1 + c^2]]
        ...     one = torch.ones((), dtype=theta.dtype)
        ...     row0 = torch.stack([one, theta[1]])
        ...     row1 = torch.stack([theta[1], 1 + theta[1] ** 2])
        ...     return theta[0] * torch.stack([row0, row1])
        >>> V = SimpleMatrix(fn, (2, 2), {"sigma^2": (0.0, ExpPow2()), "c": (0.0, Identity())})
        >>> V.set_param("c", 2.0)
        >>> V().detach()
        tensor([[1., 2.],
                [2., 5.]], dtype=torch.float64)
        >>> W = SimpleMatrix(1, lambda theta: theta[0] * torch.eye(2, dtype=theta.dtype))
        >>> W.param_names, W(torch.tensor([3.0]))
        (['theta_0'], tensor([[3., 0.],
                [0., 3.]]))
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        upstream = "num_free_params" in kwargs or (
            args and isinstance(args[0], numbers.Integral) and not isinstance(args[0], bool))
        self._manual_grad, self._free_only = None, bool(upstream)
        if upstream:
            self._init_upstream(*args, **kwargs)
        else:
            self._init_fn(*args, **kwargs)

    def _init_upstream(self, num_free_params, call, manual_grad=None, default=0.0):
        if call is None:
            raise ValueError("'call' must be provided: a function of the free parameters")
        if not callable(call):
            raise TypeError(f"call must be callable, got {type(call).__name__}")
        if manual_grad is not None and not callable(manual_grad):
            raise TypeError(f"manual_grad must be callable, got {type(manual_grad).__name__}")
        self.fn, self._manual_grad, self._shape = call, manual_grad, None
        for name, value, transform, _ in spec_tuples(simple_param_specs(num_free_params,
                                                                        default)):
            self.add_param(name, value, transform)
        V = call(self.build_params())
        if not isinstance(V, torch.Tensor) or V.dim() != 2:
            raise TypeError(f"call must return a 2-D torch.Tensor, got {V!r}")
        self._shape = (check_size(V.shape[0], "rows"), check_size(V.shape[1], "columns"))

    def _init_fn(self, fn, shape, params):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"shape must be a (rows, cols) pair, got {shape!r}")
        self._shape = (check_size(shape[0], "shape[0]"), check_size(shape[1], "shape[1]"))
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of name -> (default, Transform), "
                            f"got {type(params).__name__}")
        self.fn = fn
        for name, spec in params.items():
            if not isinstance(name, str) or not name or "/" in name or "." in name:
                raise ValueError(f"parameter names must be non-empty strings without '/' or "
                                 f"'.', got {name!r}")
            if hasattr(self, name):
                raise ValueError(f"parameter name {name!r} is reserved")
            if (not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3)
                    or not isinstance(spec[1], Transform)):
                raise TypeError(f"params[{name!r}] must be a (default, Transform) pair or a "
                                f"(default, Transform, role) triple, got {spec!r}")
            self.add_param(name, float(spec[0]), *spec[1:])
        self._evaluate(self.build_params())

    @property
    def shape(self):
        return self._shape

    def _inputs(self, nat):
        """What ``fn`` receives: all parameters, or (torch-openreml's form) the free ones."""
        return nat[self._param_table().free_index] if self._free_only else nat

    def _evaluate(self, nat):
        V = self.fn(self._inputs(nat))
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"fn must return a torch.Tensor, got {type(V).__name__}")
        if tuple(V.shape) != self._shape:
            raise ValueError(f"fn returned shape {tuple(V.shape)}, expected {self._shape}")
        return V.to(nat.dtype)

    def _jacobian(self, nat):
        J = nat.new_zeros(self.num_params, *self._shape)
        if self._manual_grad is not None:
            free_index = self._param_table().free_index
            J_free = self._manual_grad(self._inputs(nat))[0]
            if (not isinstance(J_free, torch.Tensor)
                    or tuple(J_free.shape) != (len(free_index), *self._shape)):
                raise ValueError(f"manual_grad must return (J, names) with J of shape "
                                 f"{(len(free_index), *self._shape)}")
            J[free_index] = J_free.to(nat.dtype)
            return J
        with torch.enable_grad():
            x = nat.detach().requires_grad_(True)
            V = self._evaluate(x)
            if not V.requires_grad:
                return J
            u = torch.zeros_like(V, requires_grad=True)
            (g,) = torch.autograd.grad(V, x, u, create_graph=True, allow_unused=True)
            for k in range(self.num_params if g is not None else 0):
                if g[k].requires_grad:
                    J[k] = torch.autograd.grad(g[k], u, retain_graph=True)[0]
        return J

    def _vjp(self, nat, G):
        if self._manual_grad is not None:
            return torch.einsum("kij,ij->k", self._jacobian(nat), G)
        with torch.enable_grad():
            x = nat.detach().requires_grad_(True)
            V = self._evaluate(x)
            if not V.requires_grad:
                return torch.zeros_like(nat)
            (g,) = torch.autograd.grad(V, x, G, allow_unused=True)
        return torch.zeros_like(nat) if g is None else g
