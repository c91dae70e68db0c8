"""The covariance module base: evaluation and closed-form gradients (the parameter registry is
:mod:`covmodules.params`).

Every covariance structure and every operator is a :class:`CovarianceModule`. Its parameters
are scalars with hierarchical names (``time/sigma^2``), each stored on the free
(unconstrained) scale as an ``nn.Parameter`` (or as a buffer once fixed) and mapped to the
natural scale by its constraint transform.

Subclasses provide the natural-scale math on a flat vector ``nat`` of *all* their parameters:

- ``_evaluate(nat)``: the matrix;
- ``_jacobian(nat)``: ``(num_params, *shape)`` derivatives (leaves; operators derive it);
- ``_vjp(nat, G)``: ``[<G, dV/dθ_k>]_k`` without forming the Jacobian where structure allows;
- ``_dv_matmul(nat, W, transpose)``: ``[dV/dθ_k @ W]_k`` (``dV/dθ_kᵀ @ W`` if transposed).

Building the matrix from registered parameters goes through :class:`CovarianceFunction`, whose
backward is ``_vjp``: ``loss.backward()`` never differentiates through construction code.
"""

from __future__ import annotations

import abc
from dataclasses import replace

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .cache import IntermediateCache
from .param import NameDict, ParamSpecs
from .params import ROLE_SCALE_POWER, ParameterRegistry, ParamSpec, ParamTable, default_role
from .transforms import Transform

__all__ = ["ParamSpec", "CovarianceModule", "Structure", "CovarianceFunction", "default_role",
           "ROLE_SCALE_POWER"]


class CovarianceFunction(torch.autograd.Function):
    """Builds ``V`` from free parameters; backward contracts the cotangent in closed form."""

    @staticmethod
    def forward(ctx, free, module):
        nat = module._natural(module._full_raw(free))
        ctx.module = module
        ctx.save_for_backward(free)
        return module._evaluate(nat)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (free,) = ctx.saved_tensors
        module = ctx.module
        nat = module._natural(module._full_raw(free))
        return module.to_free(module._vjp(nat, grad_output.to(nat.dtype)), free), None


class CovarianceModule(ParameterRegistry, IntermediateCache, nn.Module, abc.ABC):
    """Base of all covariance structures and operators (see the module docstring); its
    parameter registry (names, values, ``fix`` / ``free``) is
    :class:`~covmodules.params.ParameterRegistry`, its cache of intermediates
    :class:`~covmodules.cache.IntermediateCache`."""

    #: torch-openreml's switches: :meth:`grad` uses the closed form (``"default"``,
    #: ``"manual"``) or :meth:`auto_grad` (``"auto"``), which differentiates by
    #: ``torch.func.jacfwd`` / ``jacrev`` or ``torch.autograd.functional.jacobian``.
    grad_mode = "default"
    jacobian_method = "jacfwd"
    jacobian_chunk_size: int | None = None

    # ----------------------------------------------------------------- subclass interface
    @abc.abstractmethod
    def _spec_list(self) -> list[ParamSpec]:
        """Specs of all parameters, in flat order, with hierarchical names."""

    @abc.abstractmethod
    def _raw_tensors(self) -> list[torch.Tensor]:
        """The registered 0-d free-scale tensors (parameters or buffers), in flat order."""

    @abc.abstractmethod
    def _set_fixed(self, name: str, fixed: bool) -> None:
        """Move parameter ``name`` between ``nn.Parameter`` and buffer."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """Shape of the matrix."""

    @abc.abstractmethod
    def _evaluate(self, nat: torch.Tensor) -> torch.Tensor:
        """The matrix at natural-scale parameters ``nat`` (all parameters, flat order)."""

    def _matmul(self, nat: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``V @ W`` (dense by default; structures override it to avoid forming ``V``)."""
        return self._evaluate(nat) @ W

    def _jacobian(self, nat: torch.Tensor) -> torch.Tensor:
        """``(num_params, *shape)`` natural-scale derivatives."""
        eye = torch.eye(self.shape[1], dtype=nat.dtype, device=nat.device)
        return self._dv_matmul(nat, eye)

    def _vjp(self, nat: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """``[sum(G * dV/dθ_k)]_k`` for all parameters (natural scale)."""
        if self.num_params == 0:
            return nat.new_zeros(0)
        return torch.einsum("kij,ij->k", self._jacobian(nat), G)

    def _dv_matmul(self, nat: torch.Tensor, W: torch.Tensor, transpose: bool = False):
        """``[dV/dθ_k @ W]_k`` (or ``dV/dθ_kᵀ @ W``), shape ``(num_params, rows, W.shape[1])``."""
        J = self._jacobian(nat)
        return (J.transpose(1, 2) if transpose else J) @ W

    # ---------------------------------------------------------------- capability views
    # Solvers read a module's structure through these views, never through its class: a new
    # structure that offers a view is used by every solver that reads it.
    def diagonal_view(self):
        """A :class:`~covmodules.capabilities.DiagonalView` when the matrix is diagonal for
        every parameter value (``None`` by default)."""
        return None

    def repeated_block_view(self):
        """A :class:`~covmodules.capabilities.RepeatedBlock` when the matrix is ``I_L ⊗ S``
        for every parameter value, ``S`` parameterised by this module's parameters (``None``
        by default)."""
        return None

    def kronecker_view(self):
        """A :class:`~covmodules.capabilities.KroneckerView` when the matrix is ``A ⊗ B + s I``
        with square factors for every parameter value (``None`` by default)."""
        return None

    def block_diagonal_view(self):
        """A :class:`~covmodules.capabilities.BlockDiagonalView` when the matrix is block
        diagonal with square blocks (``None`` by default)."""
        return None

    def low_rank_diagonal_view(self):
        """A :class:`~covmodules.capabilities.LowRankDiagonalView` when the matrix is
        ``Λ Λᵀ + diag(ψ)`` for every parameter value (``None`` by default)."""
        return None

    def sign_reflections(self) -> dict[int, list[int]]:
        """Parameters whose sign may flip without changing the matrix: ``{i: [j, ...]}`` says
        that negating parameter ``i`` and the parameters ``j`` together leaves ``V`` unchanged
        (flat indices over all parameters). A positive parameter at its boundary whose
        likelihood increases towards negative values can then continue on the other side:
        e.g. a Cholesky column ``l_j`` enters ``V`` as ``l_j l_jᵀ``. None by default."""
        return {}

    def natural_scale(self, nat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Natural-scale summaries of a structure whose parameters are not variances and
        correlations (a Cholesky factor, loadings): ``{name: value}`` at natural parameters
        ``nat``, differentiable; empty by default. See :mod:`covmodules.natural`."""
        return {}

    # ------------------------------------------------------------------ flat <-> natural
    def _full_raw(self, free: torch.Tensor) -> torch.Tensor:
        """All parameters on the free scale: ``free`` merged with the fixed buffers."""
        table = self._param_table()
        if not table.fixed_index:
            return free
        raws = self._raw_tensors()
        fixed = torch.stack([raws[i].detach() for i in table.fixed_index]).to(free)
        order = torch.tensor(table.free_index + table.fixed_index, device=free.device)
        return torch.cat([free, fixed])[torch.argsort(order)]

    def _natural(self, raw: torch.Tensor) -> torch.Tensor:
        """Apply each parameter's transform."""
        return _by_transform(raw, self._param_table().trans_groups, "forward")

    def _free_index_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self._param_table().free_index, dtype=torch.long, device=device)

    def _free_derivative(self, free: torch.Tensor) -> torch.Tensor:
        """Element-wise derivative of the free parameters' transforms."""
        return _by_transform(free, self._param_table().free_trans_groups, "derivative")

    def _differentiable_free(self, free_params) -> torch.Tensor:
        """The registered free parameters (checked finite; gradients reach them) or the
        checked ``free_params``."""
        if free_params is not None:
            return self._check_free(free_params)
        free = self._registered_free()
        if not bool(torch.isfinite(free.detach()).all()):
            raise ValueError(f"{type(self).__name__}: parameters contain NaN or inf: "
                             f"{dict(zip(self.free_param_names, free.tolist()))}")
        return free

    def _resolve_free(self, free_params) -> torch.Tensor:
        if free_params is None:
            return self._registered_free().detach()
        return self._check_free(free_params)

    # --------------------------------------------------------------------- public API
    @property
    def param_specs(self) -> ParamSpecs:
        """The :class:`ParamSpec` of every parameter in flat order; also torch-openreml's
        mapping ``{name: {"fixed", "default", "trans"}}`` (see :mod:`covmodules.param`)."""
        return ParamSpecs(self, self._param_table().specs)

    def build_params(self, free_params=None, include_fixed: bool = True, trans: bool = True,
                     out_format: str = "tensor"):
        """Parameters at ``free_params`` (registered values when omitted): on the natural
        scale (``trans=False``: the free scale), all in flat order or (``include_fixed=False``)
        the free ones; a tensor or (``out_format="dict"``) ``{name: tensor of shape (1,)}``
        (a :class:`~covmodules.param.NameDict`: aliases find entries too).

        Example::

            >>> import torch
            >>> from covmodules import DiagonalMatrix
            >>> DiagonalMatrix(2).build_params(torch.tensor([0.0, 0.5]), out_format="dict")
            {'sigma^2[0]': tensor([1.]), 'sigma^2[1]': tensor([2.7183])}
        """
        if out_format not in ("tensor", "dict"):
            raise ValueError(f"out_format must be 'tensor' or 'dict', got {out_format!r}")
        table = self._param_table()
        free = self._resolve_free(free_params)
        values = self._full_raw(free)
        values = self._natural(values) if trans else values
        if not include_fixed:
            values = values[table.free_index]
        if out_format == "tensor":
            return values
        names = table.names if include_fixed else table.free_names
        aliases = {a: table.names[i] for a, i in table.lookup.items()}
        return NameDict({name: v.reshape(1) for name, v in zip(names, values)}, aliases)

    def get_default_dtype_device(self) -> tuple[torch.device, torch.dtype]:
        """``(device, dtype)`` of the parameters (of the buffers, or torch's defaults, without
        any), in torch-openreml's order."""
        if self.num_params == 0 and next(self.buffers(), None) is None:
            return torch.get_default_device(), torch.get_default_dtype()
        return self._device(), self._dtype()

    def forward(self, free_params=None) -> torch.Tensor:
        """The matrix at the registered parameters, or at the given free-scale values.

        ``free_params`` is a flat 1-D tensor in ``free_param_names`` order or a dict
        ``{name: value}``; the registered parameters are left untouched. Gradients flow
        to whichever was used, through the closed-form backward.
        """
        free = self._differentiable_free(free_params)
        if self.num_free_params == 0:
            return self._evaluate(self._natural(self._full_raw(free)))
        return CovarianceFunction.apply(free, self)

    def matmul(self, W: torch.Tensor, free_params=None) -> torch.Tensor:
        """``V @ W`` at the registered (or given) parameters, without autograd; structured
        modules (Kronecker, scalar, identity, sums of them) never form ``V``."""
        if not isinstance(W, torch.Tensor) or W.dim() not in (1, 2) or W.shape[0] != self.shape[1]:
            raise ValueError(f"W must be a tensor of shape ({self.shape[1]},) or "
                             f"({self.shape[1]}, r)")
        free = self._resolve_free(free_params)
        with torch.no_grad():
            nat = self._natural(self._full_raw(free))
            out = self._matmul(nat, W.reshape(W.shape[0], -1).to(nat.dtype))
        return out[:, 0] if W.dim() == 1 else out

    def trans_grad(self, free_params=None) -> torch.Tensor:
        """Element-wise derivative of the free parameters' transforms at ``free_params``."""
        return self._free_derivative(self._resolve_free(free_params))

    def to_free(self, g_nat: torch.Tensor, free_params=None) -> torch.Tensor:
        """The chain rule from the natural to the free scale: ``g_nat`` of shape
        ``(num_params, ...)`` (derivatives by every natural parameter) to
        ``(num_free_params, ...)``, ``g[free] · dnat/dfree`` at ``free_params`` (the
        registered values by default)."""
        d = self._free_derivative(self._resolve_free(free_params))
        return g_nat[self._free_index_tensor(g_nat.device)] * d.reshape(-1, *[1] * (g_nat.dim()
                                                                                      - 1))

    def manual_grad(self, free_params=None):
        """Closed-form Jacobian ``(J, names)``, ``J`` of shape ``(num_free_params, *shape)``.

        Returns ``(None, [])`` when every parameter is fixed.
        """
        if self.num_free_params == 0:
            return None, []
        free = self._resolve_free(free_params)
        with torch.no_grad():
            J = self.to_free(self._jacobian(self._natural(self._full_raw(free))), free)
        return J, self.free_param_names

    def auto_grad(self, free_params=None):
        """The same Jacobian as :meth:`manual_grad`, by automatic differentiation with
        :attr:`jacobian_method` (``"jacfwd"``, ``"jacrev"`` or ``"jacobian"``)."""
        check_jacobian_method(self.jacobian_method)
        if self.num_free_params == 0:
            return None, []
        free = self._resolve_free(free_params).detach()

        def build(f):
            return self._evaluate(self._natural(self._full_raw(f)))

        J = jacobian(build, free, self.jacobian_method, self.jacobian_chunk_size)
        return J.movedim(-1, 0), self.free_param_names

    def grad(self, free_params=None):
        """The Jacobian by :attr:`grad_mode`: closed form (``"default"``, ``"manual"``; see
        :meth:`manual_grad`) or automatic (``"auto"``; see :meth:`auto_grad`)."""
        if self.grad_mode in ("default", "manual"):
            return self.manual_grad(free_params)
        if self.grad_mode == "auto":
            return self.auto_grad(free_params)
        raise RuntimeError(f"unknown grad_mode {self.grad_mode!r}; expected 'default', "
                           "'manual' or 'auto'")

    def dV(self, w: torch.Tensor, free_params=None) -> torch.Tensor:
        """Structured products ``[dV/dθ_k @ w]_k`` over the free parameters.

        ``w`` of shape ``(cols,)`` gives ``(num_free_params, rows)``; ``(cols, r)`` gives
        ``(num_free_params, rows, r)``. No ``(K, rows, cols)`` tensor is formed where the
        structure allows.
        """
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() not in (1, 2) or w.shape[0] != self.shape[1]:
            raise ValueError(f"w must have shape ({self.shape[1]},) or ({self.shape[1]}, r), "
                             f"got {tuple(w.shape)}")
        free = self._resolve_free(free_params)
        W = w.reshape(w.shape[0], -1)
        with torch.no_grad():
            nat = self._natural(self._full_raw(free))
            out = self.to_free(self._dv_matmul(nat, W.to(nat.dtype)), free)
        return out[..., 0] if w.dim() == 1 else out

    def map_theta_to_v(self, theta=None) -> torch.Tensor:
        """torch-openreml interface: the matrix at free parameters ``theta``."""
        return self(theta)

    def map_theta_to_dv(self, theta=None) -> torch.Tensor:
        """torch-openreml interface: the Jacobian at free parameters ``theta``."""
        return self.manual_grad(theta)[0]


def _by_transform(x: torch.Tensor, groups: list[tuple[Transform, list[int]]],
                  method: str) -> torch.Tensor:
    """``t.<method>(x[i])`` for every ``i`` and its transform ``t``, one call per distinct
    transform (``groups``: a :class:`ParamTable`'s ``(transform, positions)``)."""
    if len(groups) == 1:                       # one transform for all: no gather or scatter
        out = getattr(groups[0][0], method)(x)
        return out.clone() if out is x else out
    out = torch.empty_like(x)
    for t, idx in groups:
        index = torch.tensor(idx, device=x.device)
        out[index] = getattr(t, method)(x[index])
    return out


JACOBIAN_METHODS = ("jacfwd", "jacrev", "jacobian")


def check_jacobian_method(method) -> None:
    if method not in JACOBIAN_METHODS:
        raise ValueError(f"jacobian_method must be 'jacfwd', 'jacrev' or 'jacobian', "
                         f"got {method!r}")


def jacobian(fn, x: torch.Tensor, method: str, chunk_size: int | None = None) -> torch.Tensor:
    """``d fn(x) / dx`` (shape ``(*out, *x.shape)``) by ``torch.func.jacfwd`` / ``jacrev`` or
    ``torch.autograd.functional.jacobian`` (``method``)."""
    check_jacobian_method(method)
    if method == "jacfwd":
        return torch.func.jacfwd(fn)(x)
    if method == "jacrev":
        return torch.func.jacrev(fn, chunk_size=chunk_size)(x)
    return torch.autograd.functional.jacobian(fn, x, vectorize=True)


class Structure(CovarianceModule):
    """A leaf covariance structure owning scalar parameters.

    Subclasses call :meth:`add_param` in ``__init__`` and implement ``shape``,
    ``_evaluate`` and ``_jacobian`` (plus ``_vjp`` / ``_dv_matmul`` where structure makes
    them cheaper than the Jacobian).
    """

    def __init__(self):
        super().__init__()
        self._specs: list[ParamSpec] = []

    def add_param(self, name: str, default: float, transform: Transform,
                  role: str | None = None, alias: str | None = None) -> None:
        """Register a free scalar parameter on the free scale at ``default`` (``role``: see
        :class:`ParamSpec`; inferred from the transform when omitted; ``alias``: a second
        accepted spelling of the name)."""
        spec = ParamSpec(name, float(default), transform, role=role, alias=alias)
        self.register_parameter(name, nn.Parameter(torch.tensor(float(default),
                                                                dtype=torch.float64)))
        self._specs.append(spec)
        ParamTable.specs_changed()

    def _spec_list(self) -> list[ParamSpec]:
        return list(self._specs)

    def _raw_tensors(self) -> list[torch.Tensor]:
        return [self._parameters[s.name] if s.name in self._parameters else self._buffers[s.name]
                for s in self._specs]

    def _set_fixed(self, name: str, fixed: bool) -> None:
        i = [s.name for s in self._specs].index(name)
        if self._specs[i].fixed == fixed:
            return
        if fixed:
            value = self._parameters.pop(name).detach().clone()
            self.register_buffer(name, value)
        else:
            value = self._buffers.pop(name)
            self.register_parameter(name, nn.Parameter(value.clone()))
        self._specs[i] = replace(self._specs[i], fixed=fixed)

    @property
    def repr_dict(self) -> dict:
        """Key-value pairs shown by ``repr``: the size and natural-scale parameters."""
        return {"shape": self.shape, **{k: round(v, 6) for k, v in self.params.items()}}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.repr_dict.items())
