"""A module's parameter table: the all / free / fixed views of its parameter specs, built once.

``CovarianceModule.param_names``, ``free_param_index``, ``fixed_param_trans``, ... all read one
:class:`ParamTable`, cached on the module. A table is valid while no module's specs have
changed since it was built: ``fix``, ``free``, ``Structure.add_param`` and setting an operand
(any submodule) call :meth:`ParamTable.specs_changed`, and every table is rebuilt on its next
use. (A change below a module changes the module's table too, so the rule is global; a change
is rare, a rebuild cheap, a read one comparison.)
"""

from __future__ import annotations

import torch

__all__ = ["ParamTable"]


class ParamTable:
    """Names, flat indices, defaults, transforms and roles of ``specs`` (a module's
    ``param_specs``): all, free and fixed."""

    generation = 0           # counts the changes of any module's specs or operands

    def __init__(self, specs):
        self.built = ParamTable.generation
        self.specs = tuple(specs)
        self.names = [s.name for s in self.specs]
        self.position = {name: i for i, name in enumerate(self.names)}
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
        self.free_roles = [self.specs[i].role for i in self.free_index]

    @property
    def current(self) -> bool:
        """Whether no module's specs or operands changed since this table was built."""
        return self.built == ParamTable.generation

    @staticmethod
    def specs_changed() -> None:
        """Say that some module's parameter specs or operands changed: every table is stale."""
        ParamTable.generation += 1
