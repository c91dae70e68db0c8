"""The covariance module base: parameter registry, evaluation and closed-form gradients.

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
import hashlib
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .params import ParamTable
from .transforms import Chain, Exp, ExpPow2, Sigmoid, Softplus, Transform

__all__ = ["ParamSpec", "CovarianceModule", "Structure", "CovarianceFunction", "default_role",
           "ROLE_SCALE_POWER"]


#: How a parameter's natural value scales when ``y`` is multiplied by ``s``: by ``s ** power``.
ROLE_SCALE_POWER = {"variance": 2, "sd": 1, "loading": 1, "correlation": 0, "free": 0}


@dataclass(frozen=True)
class ParamSpec:
    """One scalar parameter: its name, free-scale default, constraint transform, fixed flag and
    role.

    The role says what the natural value means: ``"variance"`` (positive, boundary at 0),
    ``"sd"`` (a positive standard-deviation-like value, boundary at 0), ``"correlation"``
    (bounded), ``"loading"`` (an unbounded value in the units of ``y``: a Cholesky or
    factor-analytic loading) or ``"free"`` (unitless). ``None`` infers it from the transform.
    """

    name: str
    default: float
    transform: Transform
    fixed: bool = False
    role: str | None = None

    def __post_init__(self):
        role = default_role(self.transform) if self.role is None else self.role
        if role not in ROLE_SCALE_POWER:
            raise ValueError(f"role of parameter {self.name!r} must be one of "
                             f"{list(ROLE_SCALE_POWER)}, got {role!r}")
        object.__setattr__(self, "role", role)

    @property
    def scale_power(self) -> int:
        """``k`` such that the natural value scales as ``s ** k`` when ``y`` scales by ``s``."""
        return ROLE_SCALE_POWER[self.role]


def default_role(transform: Transform) -> str:
    """The role a transform implies: variance for ``exp(2x)`` / softplus, sd for ``exp(x)``,
    correlation for a sigmoid (alone or in a chain), free otherwise."""
    if isinstance(transform, (ExpPow2, Softplus)):
        return "variance"
    if isinstance(transform, Exp):
        return "sd"
    parts = transform.transforms if isinstance(transform, Chain) else [transform]
    return "correlation" if any(isinstance(t, Sigmoid) for t in parts) else "free"


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


class CovarianceModule(nn.Module, abc.ABC):
    """Base of all covariance structures and operators (see the module docstring)."""

    # ----------------------------------------------------------------- subclass interface
    @property
    @abc.abstractmethod
    def param_specs(self) -> list[ParamSpec]:
        """Specs of all parameters, in flat order, with hierarchical names."""

    @abc.abstractmethod
    def _raw_tensors(self) -> list[torch.Tensor]:
        """The registered 0-d free-scale tensors (parameters or buffers), in flat order."""

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

    def sign_reflections(self) -> dict[int, list[int]]:
        """Parameters whose sign may flip without changing the matrix: ``{i: [j, ...]}`` says
        that negating parameter ``i`` and the parameters ``j`` together leaves ``V`` unchanged
        (flat indices over all parameters). A positive parameter at its boundary whose
        likelihood increases towards negative values can then continue on the other side:
        e.g. a Cholesky column ``l_j`` enters ``V`` as ``l_j l_jᵀ``. None by default."""
        return {}

    # ------------------------------------------------------------------ parameter registry
    # Every view reads one cached table (covmodules.params.ParamTable); what they return are
    # copies, so a caller cannot change the table.
    def _param_table(self) -> ParamTable:
        """This module's :class:`~covmodules.params.ParamTable`, rebuilt once stale."""
        table = self.__dict__.get("_param_table_cache")
        if table is None or not table.current:
            table = self.__dict__["_param_table_cache"] = ParamTable(self.param_specs)
        return table

    def add_module(self, name: str, module) -> None:
        super().add_module(name, module)
        ParamTable.specs_changed()              # a new operand: new specs

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, nn.Module):
            ParamTable.specs_changed()
        super().__setattr__(name, value)

    @property
    def param_names(self) -> list[str]:
        return list(self._param_table().names)

    @property
    def free_param_names(self) -> list[str]:
        return list(self._param_table().free_names)

    @property
    def fixed_param_names(self) -> list[str]:
        return list(self._param_table().fixed_names)

    @property
    def free_param_index(self) -> list[int]:
        return list(self._param_table().free_index)

    @property
    def fixed_param_index(self) -> list[int]:
        return list(self._param_table().fixed_index)

    @property
    def param_defaults(self) -> torch.Tensor:
        return self._param_table().defaults.clone()

    @property
    def free_param_defaults(self) -> torch.Tensor:
        return self._param_table().free_defaults.clone()

    @property
    def fixed_param_defaults(self) -> torch.Tensor:
        return self._param_table().fixed_defaults.clone()

    @property
    def param_trans(self) -> list[Transform]:
        return list(self._param_table().trans)

    @property
    def free_param_trans(self) -> list[Transform]:
        return list(self._param_table().free_trans)

    @property
    def fixed_param_trans(self) -> list[Transform]:
        return list(self._param_table().fixed_trans)

    @property
    def free_param_roles(self) -> list[str]:
        """The role of each free parameter (see :class:`ParamSpec`)."""
        return list(self._param_table().free_roles)

    @property
    def num_params(self) -> int:
        return len(self._param_table().specs)

    @property
    def num_free_params(self) -> int:
        return len(self._param_table().free_index)

    @property
    def num_fixed_params(self) -> int:
        return len(self._param_table().fixed_index)

    # ------------------------------------------------------------ natural-scale get / set
    def get_param(self, name: str) -> float:
        """Natural-scale value of parameter ``name`` (free or fixed)."""
        i = self._index_of(name)
        raw = self._raw_tensors()[i].detach()
        return float(self._param_table().trans[i].forward(raw))

    def set_param(self, name: str, value: float) -> None:
        """Set parameter ``name`` to the natural-scale ``value`` (e.g. ``sigma^2 = 2.5``)."""
        i = self._index_of(name)
        transform, raw = self._param_table().trans[i], self._raw_tensors()[i]
        x = transform.inverse(torch.as_tensor(float(value), dtype=torch.float64))
        if not torch.isfinite(x):
            raise ValueError(f"value {value} is outside the domain of parameter {name!r}")
        with torch.no_grad():
            raw.copy_(x)

    def set_params(self, values: dict[str, float]) -> None:
        """Set several parameters by name on the natural scale."""
        for name, value in values.items():
            self.set_param(name, value)

    @property
    def params(self) -> dict[str, float]:
        """All parameters by name on the natural scale."""
        return {name: self.get_param(name) for name in self.param_names}

    def fix(self, name: str, value: float | None = None) -> None:
        """Fix parameter ``name`` (optionally at natural-scale ``value``); it becomes a buffer.

        Build optimisers after fixing or freeing: one built before keeps the old tensor.
        """
        if value is not None:
            self.set_param(name, value)
        self._set_fixed(self._check_name(name), True)
        ParamTable.specs_changed()

    def free(self, name: str) -> None:
        """Make a fixed parameter free again (an ``nn.Parameter``)."""
        self._set_fixed(self._check_name(name), False)
        ParamTable.specs_changed()

    def free_params(self) -> torch.Tensor:
        """The registered free parameters as a flat, detached free-scale tensor."""
        return self._registered_free().detach()

    def set_free_params(self, free_params) -> None:
        """Set the registered free parameters from a flat free-scale tensor or a dict."""
        free = self._check_free(free_params)
        raws = self._raw_tensors()
        with torch.no_grad():
            for i, value in zip(self._param_table().free_index, free.detach().tolist()):
                raws[i].fill_(value)

    def reset_parameters(self) -> None:
        """Set every parameter to its default."""
        with torch.no_grad():
            for raw, spec in zip(self._raw_tensors(), self._param_table().specs):
                raw.fill_(spec.default)

    @abc.abstractmethod
    def _set_fixed(self, name: str, fixed: bool) -> None:
        """Move parameter ``name`` between ``nn.Parameter`` and buffer."""

    def _index_of(self, name: str) -> int:
        return self._param_table().position[self._check_name(name)]

    def _check_name(self, name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"parameter name must be a str, got {type(name).__name__}")
        if name not in self._param_table().position:
            raise ValueError(f"unknown parameter {name!r}; valid names: {self.param_names}")
        return name

    # ------------------------------------------------------------------ flat <-> natural
    def _registered_free(self) -> torch.Tensor:
        raws = self._raw_tensors()
        free = [raws[i] for i in self._param_table().free_index]
        if not free:
            return torch.zeros(0, dtype=self._dtype(), device=self._device())
        return torch.stack(free)

    def _dtype(self) -> torch.dtype:
        raws = self._raw_tensors()
        return raws[0].dtype if raws else _buffer_dtype(self)

    def _device(self) -> torch.device:
        raws = self._raw_tensors()
        return raws[0].device if raws else _buffer_device(self)

    def _check_free(self, free_params) -> torch.Tensor:
        names = self._param_table().free_names
        if isinstance(free_params, dict):
            unknown = [k for k in free_params if k not in names]
            missing = [k for k in names if k not in free_params]
            if unknown or missing:
                raise ValueError(
                    f"free_params dict: unknown names {unknown}, missing names {missing}; "
                    f"valid free parameter names: {names}")
            values = [torch.as_tensor(free_params[k]) for k in names]
            if any(v.numel() != 1 for v in values):
                raise ValueError("free_params dict values must be scalars")
            dtype = values[0].dtype if values and values[0].is_floating_point() else self._dtype()
            free = (torch.stack([v.reshape(()).to(dtype) for v in values]) if values
                    else torch.zeros(0, dtype=dtype))
        elif isinstance(free_params, torch.Tensor):
            free = free_params
            if free.dim() != 1:
                raise ValueError(f"free_params must be a 1-D tensor, got shape {tuple(free.shape)}")
            if free.numel() != len(names):
                raise ValueError(f"expected {len(names)} free parameters, got {free.numel()}")
            if not free.is_floating_point():
                raise TypeError(f"free_params must be a floating-point tensor, got {free.dtype}")
        else:
            raise TypeError("free_params must be a torch.Tensor or a dict of name -> value, "
                            f"got {type(free_params).__name__}")
        if not bool(torch.isfinite(free).all()):
            finite = torch.isfinite(free.detach()).tolist()
            bad = [n for n, ok in zip(names, finite) if not ok]
            raise ValueError(f"free_params contains NaN or inf for {bad}")
        return free

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
        return _by_transform(raw, self._param_table().trans, "forward")

    def _free_index_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self._param_table().free_index, dtype=torch.long, device=device)

    def _free_derivative(self, free: torch.Tensor) -> torch.Tensor:
        """Element-wise derivative of the free parameters' transforms."""
        return _by_transform(free, self._param_table().free_trans, "derivative")

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
    def build_params(self, free_params=None, include_fixed: bool = True) -> torch.Tensor:
        """Natural-scale parameters at ``free_params`` (registered values when omitted).

        With ``include_fixed`` all parameters in flat order, otherwise the free ones only.
        """
        free = self._resolve_free(free_params)
        nat = self._natural(self._full_raw(free))
        return nat if include_fixed else nat[self._param_table().free_index]

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
        """The same Jacobian as :meth:`manual_grad`, by automatic differentiation."""
        if self.num_free_params == 0:
            return None, []
        free = self._resolve_free(free_params).detach()

        def build(f):
            return self._evaluate(self._natural(self._full_raw(f)))

        J = torch.autograd.functional.jacobian(build, free, vectorize=True)
        return J.movedim(-1, 0), self.free_param_names

    def grad(self, free_params=None):
        """The Jacobian, in closed form (see :meth:`manual_grad`)."""
        return self.manual_grad(free_params)

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

    # ------------------------------------------------------------- intermediate cache
    def get_intermediates(self, params: torch.Tensor):
        """Cached intermediates for ``params`` if still valid, else ``None``.

        Nothing is cached or returned for parameters that carry a graph (autograd paths).
        """
        if params.requires_grad:
            return None
        cache = self.__dict__.get("_intermediates")
        if cache is not None and cache[0] == _fingerprint(params):
            return cache[1]
        return None

    def set_intermediates(self, params: torch.Tensor, intermediates) -> None:
        """Cache ``intermediates`` computed at ``params``."""
        if not params.requires_grad:
            self.__dict__["_intermediates"] = (_fingerprint(params), intermediates)

    def reset_intermediates(self) -> None:
        """Clear the intermediate cache."""
        self.__dict__.pop("_intermediates", None)

    def _apply(self, fn, *args, **kwargs):
        self.reset_intermediates()
        return super()._apply(fn, *args, **kwargs)


def _by_transform(x: torch.Tensor, transforms: list[Transform], method: str) -> torch.Tensor:
    """``transforms[i].<method>(x[i])`` for every ``i``, one call per distinct transform."""
    out = torch.empty_like(x)
    groups: dict[Transform, list[int]] = {}
    for i, t in enumerate(transforms):
        groups.setdefault(t, []).append(i)
    for t, idx in groups.items():
        index = torch.tensor(idx, device=x.device)
        out[index] = getattr(t, method)(x[index])
    return out


def _fingerprint(params: torch.Tensor):
    data = params.detach().cpu().contiguous().numpy().tobytes()
    return (params.dtype, params.device, hashlib.blake2b(data, digest_size=16).digest())


def _buffer_dtype(module: nn.Module) -> torch.dtype:
    for b in module.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float64


def _buffer_device(module: nn.Module) -> torch.device:
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


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
                  role: str | None = None) -> None:
        """Register a free scalar parameter on the free scale at ``default`` (``role``: see
        :class:`ParamSpec`; inferred from the transform when omitted)."""
        spec = ParamSpec(name, float(default), transform, role=role)
        self.register_parameter(name, nn.Parameter(torch.tensor(float(default),
                                                                dtype=torch.float64)))
        self._specs.append(spec)
        ParamTable.specs_changed()

    @property
    def param_specs(self) -> list[ParamSpec]:
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
