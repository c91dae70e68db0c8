"""A covariance module's parameters: their specs, one cached table of them, the registry.

Each parameter is a scalar with a hierarchical name (``time/sigma^2``) and a
:class:`ParamSpec`: its free-scale default, constraint transform, fixed flag and role.
``CovarianceModule.param_names``, ``free_param_index``, ``fixed_param_trans``, ... (the
:class:`ParameterRegistry` every covariance module inherits) all read one :class:`ParamTable`,
cached on the module. A table is valid while no module's specs have changed since it was
built: ``fix``, ``free``, ``Structure.add_param`` and setting an operand (any submodule) call
:meth:`ParamTable.specs_changed`, and every table is rebuilt on its next use. (A change below
a module changes the module's table too, so the rule is global; a change is rare, a rebuild
cheap, a read one comparison.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .transforms import Chain, Exp, ExpPow2, Sigmoid, Softplus, Transform

__all__ = ["ParamSpec", "ParamTable", "ParameterRegistry", "default_role", "ROLE_SCALE_POWER"]


#: How a parameter's natural value scales when ``y`` is multiplied by ``s``: by ``s ** power``.
ROLE_SCALE_POWER = {"variance": 2, "sd": 1, "loading": 1, "correlation": 0, "free": 0}


@dataclass(frozen=True)
class ParamSpec:
    """One scalar parameter: its name, free-scale default, constraint transform, fixed flag,
    role and optional ``alias`` (a second spelling accepted wherever a name is: torch-openreml's
    ``sigma^2_0`` for ``sigma^2[0]``).

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
    alias: str | None = None

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


class ParamTable:
    """Names, flat indices, defaults, transforms and roles of ``specs`` (a module's
    ``param_specs``): all, free and fixed."""

    generation = 0           # counts the changes of any module's specs or operands

    def __init__(self, specs):
        self.built = ParamTable.generation
        self.specs = tuple(specs)
        self.names = [s.name for s in self.specs]
        self.position = {name: i for i, name in enumerate(self.names)}
        aliases = {s.alias: i for i, s in enumerate(self.specs) if s.alias is not None}
        self.lookup = {**aliases, **self.position}         # a name wins over an alias
        self.free_index = [i for i, s in enumerate(self.specs) if not s.fixed]
        self.fixed_index = [i for i, s in enumerate(self.specs) if s.fixed]
        self.free_names = [self.names[i] for i in self.free_index]
        self.fixed_names = [self.names[i] for i in self.fixed_index]
        self.defaults = torch.tensor([s.default for s in self.specs], dtype=torch.float64)
        self.free_defaults = self.defaults[self.free_index]
        self.fixed_defaults = self.defaults[self.fixed_index]
        self.trans = [s.transform for s in self.specs]
        self.free_trans = [self.trans[i] for i in self.free_index]
        self.fixed_trans = [self.trans[i] for i in self.fixed_index]
        self.trans_groups = transform_groups(self.trans)
        self.free_trans_groups = transform_groups(self.free_trans)
        self.free_roles = [self.specs[i].role for i in self.free_index]

    @property
    def current(self) -> bool:
        """Whether no module's specs or operands changed since this table was built."""
        return self.built == ParamTable.generation

    @staticmethod
    def specs_changed() -> None:
        """Say that some module's parameter specs or operands changed: every table is stale."""
        ParamTable.generation += 1


def transform_groups(transforms: list[Transform]) -> list[tuple[Transform, list[int]]]:
    """``[(transform, [i, ...])]``: the positions of each distinct transform, in first-seen
    order."""
    groups: dict[Transform, list[int]] = {}
    for i, t in enumerate(transforms):
        groups.setdefault(t, []).append(i)
    return list(groups.items())


class ParameterRegistry:
    """The parameter registry of a :class:`~covmodules.base.CovarianceModule`: the all / free /
    fixed views of its :class:`ParamTable`, natural-scale values by name, ``fix`` / ``free``
    and the registered free vector. Reads the module's ``_spec_list()``, ``_raw_tensors()`` and
    ``_set_fixed``. Wherever a name is accepted, a parameter's alias is too."""

    # Every view reads one cached ParamTable; what they return are copies, so a caller cannot
    # change the table.
    def _param_table(self) -> ParamTable:
        """This module's :class:`ParamTable`, rebuilt once stale."""
        table = self.__dict__.get("_param_table_cache")
        if table is None or not table.current:
            table = self.__dict__["_param_table_cache"] = ParamTable(self._spec_list())
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

    def _index_of(self, name: str) -> int:
        return self._param_table().position[self._check_name(name)]

    def _check_name(self, name: str) -> str:
        """The parameter's name, given its name or its alias."""
        if not isinstance(name, str):
            raise TypeError(f"parameter name must be a str, got {type(name).__name__}")
        table = self._param_table()
        if name not in table.lookup:
            raise ValueError(f"unknown parameter {name!r}; valid names: {self.param_names}")
        return table.names[table.lookup[name]]

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
        table = self._param_table()
        names = table.free_names
        if isinstance(free_params, dict):
            by_name = {table.names[table.lookup[k]] if k in table.lookup else k: v
                       for k, v in free_params.items()}
            if len(by_name) != len(free_params):
                raise ValueError("free_params dict names a parameter twice (by its name and "
                                 f"its alias): {list(free_params)}")
            unknown = [k for k in by_name if k not in names]
            missing = [k for k in names if k not in by_name]
            if unknown or missing:
                raise ValueError(
                    f"free_params dict: unknown names {unknown}, missing names {missing}; "
                    f"valid free parameter names: {names}")
            values = [torch.as_tensor(by_name[k]) for k in names]
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


def _buffer_dtype(module: nn.Module) -> torch.dtype:
    for b in module.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float64


def _buffer_device(module: nn.Module) -> torch.device:
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
