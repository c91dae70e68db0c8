"""torch-openreml's parameter-specification mapping (the module keeps upstream's name,
``torch_openreml.covariance.param``).

Upstream describes parameters by a dict ``{name: {"fixed": bool, "default": 1-D tensor,
"trans": Transform}}``. Here :attr:`CovarianceModule.param_specs` is a :class:`ParamSpecs`:
iterating it gives the :class:`~covmodules.ParamSpec` records in flat order, and it is
also that mapping. ``specs[name]`` (the name or its alias) is a live :class:`SpecEntry`:
setting ``"fixed"`` fixes or frees the parameter, setting ``"default"`` sets its free-scale
value; a transform is fixed at construction.

Example::

    >>> from covmodules import DiagonalMatrix
    >>> V = DiagonalMatrix(3)
    >>> V.param_specs["sigma^2_2"]["fixed"] = True
    >>> V.fixed_param_names
    ['sigma^2[2]']
    >>> V.param_specs["sigma^2[2]"]["default"]
    tensor([0.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch

from .transforms import Identity, Transform

__all__ = ["ParamSpecs", "SpecEntry", "NameDict", "simple_param_specs", "spec_tuples"]

FIELDS = ("fixed", "default", "trans")


class SpecEntry(MutableMapping):
    """One parameter's ``{"fixed", "default", "trans"}``, read from and written to its module."""

    def __init__(self, module, name: str):
        self._module, self._name = module, name

    def __getitem__(self, key):
        m, name = self._module, self._name
        i = m._index_of(name)
        if key == "fixed":
            return m._param_table().specs[i].fixed
        if key == "default":
            return m._raw_tensors()[i].detach().reshape(1).clone()
        if key == "trans":
            return m._param_table().trans[i]
        raise KeyError(f"a parameter specification has the fields {list(FIELDS)}, got {key!r}")

    def __setitem__(self, key, value) -> None:
        m, name = self._module, self._name
        if key == "fixed":
            if not isinstance(value, bool):
                raise TypeError(f"param_specs[{name!r}]['fixed'] must be a bool, "
                                f"got {type(value).__name__}")
            m.fix(name) if value else m.free(name)
        elif key == "default":
            x = torch.as_tensor(value, dtype=torch.float64)
            if x.numel() != 1 or not bool(torch.isfinite(x).all()):
                raise ValueError(f"param_specs[{name!r}]['default'] must be one finite "
                                 f"free-scale value, got {value!r}")
            with torch.no_grad():
                m._raw_tensors()[m._index_of(name)].fill_(float(x.reshape(())))
        elif key == "trans":
            raise TypeError(f"the transform of {name!r} is fixed at construction; build the "
                            "structure with the transform you want (e.g. SimpleMatrix)")
        else:
            raise KeyError(f"a parameter specification has the fields {list(FIELDS)}, "
                           f"got {key!r}")

    def __delitem__(self, key):
        raise TypeError("parameter specification fields cannot be deleted")

    def __iter__(self):
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class ParamSpecs(list):
    """The module's :class:`~covmodules.ParamSpec` records in flat order, and upstream's
    mapping: ``[name]`` (name or alias), ``keys()``, ``values()``, ``items()``, ``in``."""

    def __init__(self, module, specs):
        super().__init__(specs)
        self._module = module

    def __getitem__(self, key):
        if not isinstance(key, str):
            return super().__getitem__(key)
        if key not in self:
            raise KeyError(f"unknown parameter {key!r}; valid names: {self.keys()}")
        return SpecEntry(self._module, self._module._check_name(key))

    def __contains__(self, key) -> bool:
        if isinstance(key, str):
            return key in self._module._param_table().lookup
        return super().__contains__(key)

    def keys(self) -> list[str]:
        return [s.name for s in self]

    def values(self) -> list[SpecEntry]:
        return [self[s.name] for s in self]

    def items(self) -> list[tuple[str, SpecEntry]]:
        return [(s.name, self[s.name]) for s in self]

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __eq__(self, other) -> bool:
        if isinstance(other, Mapping):                 # upstream's dict
            return dict(self.items()) == dict(other)
        return super().__eq__(other)

    __hash__ = None


class NameDict(dict):
    """A dict keyed by parameter names (or operand paths) that also finds an entry by its
    torch-openreml spelling (``aliases``: alias -> key)."""

    def __init__(self, items, aliases: dict[str, str]):
        super().__init__(items)
        self.aliases = {a: k for a, k in aliases.items() if a != k}

    def _key(self, key):
        return key if dict.__contains__(self, key) else self.aliases.get(key, key)

    def __getitem__(self, key):
        return super().__getitem__(self._key(key))

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, self._key(key))

    def get(self, key, default=None):
        return self[key] if key in self else default


def simple_param_specs(n: int, default=0.0, trans: Transform | None = None) -> dict:
    """torch-openreml's ``n`` free parameters ``theta_0``, ... at ``default`` with one
    transform (identity by default), as its specification dict.

    Example::

        >>> from covmodules import simple_param_specs
        >>> simple_param_specs(2)["theta_1"]
        {'fixed': False, 'default': tensor([0.]), 'trans': Identity()}
    """
    trans = Identity() if trans is None else trans
    if not isinstance(trans, Transform):
        raise TypeError(f"trans must be a Transform, got {type(trans).__name__}")
    if isinstance(default, torch.Tensor):
        if default.shape != (1,):
            raise ValueError(f"a tensor default must have shape (1,), got {tuple(default.shape)}")
        d = default.detach()
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        d = torch.tensor([float(default)])
    else:
        raise TypeError(f"default must be a float, an int or a tensor of shape (1,), "
                        f"got {type(default).__name__}")
    return {f"theta_{i}": {"fixed": False, "default": d.clone(), "trans": trans}
            for i in range(n)}


def spec_tuples(param_specs) -> list[tuple[str, float, Transform, bool]]:
    """``(name, default, transform, fixed)`` of each entry of an upstream specification dict,
    checked as upstream checks it."""
    if not isinstance(param_specs, Mapping):
        raise TypeError(f"param_specs must be a dict of name -> {{'fixed', 'default', 'trans'}}, "
                        f"got {type(param_specs).__name__}")
    out = []
    for name, spec in param_specs.items():
        if not isinstance(name, str) or not name or "/" in name or "." in name:
            raise ValueError(f"parameter names must be non-empty strings without '/' or '.', "
                             f"got {name!r}")
        if not isinstance(spec, Mapping) or sorted(spec) != sorted(FIELDS):
            raise TypeError(f"param_specs[{name!r}] must be a dict with the fields "
                            f"{list(FIELDS)}, got {spec!r}")
        default, trans, fixed = spec["default"], spec["trans"], spec["fixed"]
        if not isinstance(fixed, bool):
            raise TypeError(f"param_specs[{name!r}]['fixed'] must be a bool")
        if not isinstance(default, torch.Tensor) or default.numel() != 1 or default.dim() != 1:
            raise TypeError(f"param_specs[{name!r}]['default'] must be a tensor of shape (1,)")
        if not isinstance(trans, Transform):
            raise TypeError(f"param_specs[{name!r}]['trans'] must be a Transform")
        out.append((name, float(default), trans, fixed))
    return out
