"""Constraint transforms between the free (unconstrained) and the natural scale.

A transform maps a free value ``x`` (any real number) to a natural value ``y = forward(x)``
(a variance, a correlation, ...). Each has ``forward``, ``inverse`` and the element-wise
``derivative`` ``dy/dx`` evaluated at ``x``. All work element-wise on tensors of any shape.
torch-openreml's names work too: ``grad`` is ``derivative``, ``domain`` / ``codomain`` describe
the two scales, and ``TransformExp``, ``TransformChain([...])``, ``TransformPow(factor=2.0)``, ...
are the classes below (the upstream module path ``covmodules.transform`` has them as well).

Example::

    >>> import torch
    >>> from covmodules.transforms import Chain, ScaleShift, Sigmoid
    >>> rho = Chain(Sigmoid(), ScaleShift(2.0, -1.0))      # rho = 2 sigmoid(x) - 1
    >>> x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> torch.allclose(rho.inverse(rho.forward(x)), x)
    True
"""

import abc
import math

import torch
import torch.nn.functional as F

#: torch-openreml's transform names, defined at the end of this module.
UPSTREAM_NAMES = ["TransformIdentity", "TransformExp", "TransformExp2", "TransformExp10",
                  "TransformExpPow2", "TransformSigmoid", "TransformScaleShift", "TransformPow",
                  "TransformChain"]

__all__ = ["Transform", "Identity", "Exp", "Exp2", "Exp10", "ExpPow2", "Softplus", "Sigmoid",
           "ScaleShift", "Pow", "Chain", "correlation", *UPSTREAM_NAMES]


class Transform(abc.ABC):
    """Base class: subclasses implement ``forward``, ``inverse`` and ``derivative``;
    ``domain`` and ``codomain`` name the free and the natural scale."""

    domain = "ℝ"
    codomain = "ℝ"

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Natural value at free value ``x``."""

    @abc.abstractmethod
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Free value at natural value ``y``."""

    @abc.abstractmethod
    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise ``d forward / dx`` at free value ``x``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """torch-openreml's name for :meth:`derivative`."""
        return self.derivative(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return f"{type(self).__name__}: {self.domain} ↦ {self.codomain}"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.__dict__.items()))))


class Identity(Transform):
    """``y = x``."""

    def forward(self, x):
        return x

    def inverse(self, y):
        return y

    def derivative(self, x):
        return torch.ones_like(x)


class Exp(Transform):
    """``y = exp(x)``, ``y > 0``."""

    codomain = "ℝ⁺"

    def forward(self, x):
        return torch.exp(x)

    def inverse(self, y):
        return torch.log(y)

    def derivative(self, x):
        return torch.exp(x)


class Exp2(Transform):
    """``y = 2 ** x``, ``y > 0``."""

    codomain = "ℝ⁺"

    def forward(self, x):
        return torch.exp2(x)

    def inverse(self, y):
        return torch.log2(y)

    def derivative(self, x):
        return torch.exp2(x) * math.log(2.0)


class Exp10(Transform):
    """``y = 10 ** x``, ``y > 0``."""

    codomain = "ℝ⁺"

    def forward(self, x):
        return torch.pow(10.0, x)

    def inverse(self, y):
        return torch.log10(y)

    def derivative(self, x):
        return torch.pow(10.0, x) * math.log(10.0)


class ExpPow2(Transform):
    """``y = exp(2 x)``: a variance whose square root is ``exp(x)``."""

    codomain = "ℝ⁺"

    def forward(self, x):
        return torch.exp(2 * x)

    def inverse(self, y):
        return 0.5 * torch.log(y)

    def derivative(self, x):
        return 2 * torch.exp(2 * x)


class Softplus(Transform):
    """``y = log(1 + exp(x))``, ``y > 0``."""

    codomain = "ℝ⁺"

    def forward(self, x):
        return F.softplus(x)

    def inverse(self, y):
        return y + torch.log(-torch.expm1(-y))

    def derivative(self, x):
        return torch.sigmoid(x)


class Sigmoid(Transform):
    """``y = 1 / (1 + exp(-x))``, ``0 < y < 1``."""

    codomain = "(0, 1)"

    def forward(self, x):
        return torch.sigmoid(x)

    def inverse(self, y):
        return torch.log(y) - torch.log1p(-y)

    def derivative(self, x):
        s = torch.sigmoid(x)
        return s * (1 - s)


class ScaleShift(Transform):
    """``y = a x + b`` with ``a != 0``."""

    def __init__(self, a: float = 1.0, b: float = 0.0):
        if not math.isfinite(a) or a == 0 or not math.isfinite(b):
            raise ValueError(f"ScaleShift needs finite a != 0 and finite b, got a={a}, b={b}")
        self.a, self.b = float(a), float(b)

    def forward(self, x):
        return self.a * x + self.b

    def inverse(self, y):
        return (y - self.b) / self.a

    def derivative(self, x):
        return torch.full_like(x, self.a)

    def __repr__(self):
        return f"ScaleShift(a={self.a:g}, b={self.b:g})"


class Pow(Transform):
    """``y = x ** p`` for ``x > 0`` (any ``x`` when ``p`` is an odd integer)."""

    def __init__(self, p: float):
        if not math.isfinite(p) or p == 0:
            raise ValueError(f"Pow needs a finite exponent p != 0, got p={p}")
        self.p = float(p)

    def forward(self, x):
        return torch.pow(x, self.p)

    def inverse(self, y):
        if self.p.is_integer() and int(self.p) % 2 == 1:
            return torch.sign(y) * torch.pow(torch.abs(y), 1.0 / self.p)
        return torch.pow(y, 1.0 / self.p)

    def derivative(self, x):
        return self.p * torch.pow(x, self.p - 1)

    def __repr__(self):
        return f"Pow(p={self.p:g})"


class Chain(Transform):
    """Composition applied left to right: ``Chain(f, g)(x) = g(f(x))``; ``Chain([f, g])``
    (torch-openreml's ``TransformChain`` form) is the same."""

    def __init__(self, *transforms: Transform):
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
            transforms = tuple(transforms[0])
        if not transforms or not all(isinstance(t, Transform) for t in transforms):
            raise TypeError("Chain needs one or more Transform instances")
        self.transforms = tuple(transforms)

    @property
    def chain(self) -> list[Transform]:
        """The transforms in order (torch-openreml's attribute)."""
        return list(self.transforms)

    @property
    def domain(self):
        return self.transforms[0].domain

    @property
    def codomain(self):
        return self.transforms[-1].codomain

    def forward(self, x):
        for t in self.transforms:
            x = t.forward(x)
        return x

    def inverse(self, y):
        for t in reversed(self.transforms):
            y = t.inverse(y)
        return y

    def derivative(self, x):
        d = torch.ones_like(x)
        for t in self.transforms:
            d = d * t.derivative(x)
            x = t.forward(x)
        return d

    def __repr__(self):
        return f"Chain({', '.join(map(repr, self.transforms))})"


def correlation(lower: float = -1.0) -> Chain:
    """Map the real line onto ``(lower, 1)``: ``rho = lower + (1 - lower) sigmoid(x)``.

    With ``lower = -1`` this is ``2 sigmoid(x) - 1`` (AR(1), the seed's default).
    """
    if not -1.0 <= lower < 1.0:
        raise ValueError(f"correlation needs a lower bound -1 <= lower < 1, got lower={lower}")
    return Chain(Sigmoid(), ScaleShift(1.0 - lower, lower))


class TransformPow(Pow):
    """torch-openreml's ``TransformPow(factor=2.0)``: :class:`Pow` with ``p = factor``."""

    def __init__(self, factor: float = 2.0):
        super().__init__(factor)

    @property
    def factor(self) -> float:
        return self.p


TransformIdentity, TransformExp, TransformExp2, TransformExp10 = Identity, Exp, Exp2, Exp10
TransformExpPow2, TransformSigmoid, TransformScaleShift = ExpPow2, Sigmoid, ScaleShift
TransformChain = Chain
