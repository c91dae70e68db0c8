"""torch-openreml's module path for the transforms (``torch_openreml.covariance.transform``):
the classes of :mod:`covmodules.transforms` under upstream's names.

Example::

    >>> import torch
    >>> from covmodules.transform import TransformChain, TransformScaleShift, TransformSigmoid
    >>> rho = TransformChain([TransformSigmoid(), TransformScaleShift(2.0, -1.0)])
    >>> rho(torch.tensor([0.0])), rho.grad(torch.tensor([0.0]))
    (tensor([0.]), tensor([0.5000]))
"""

from .transforms import (Transform, TransformChain, TransformExp, TransformExp2, TransformExp10,
                         TransformExpPow2, TransformIdentity, TransformPow, TransformScaleShift,
                         TransformSigmoid)

__all__ = ["Transform", "TransformIdentity", "TransformExp", "TransformExp2", "TransformExp10",
           "TransformExpPow2", "TransformSigmoid", "TransformScaleShift", "TransformPow",
           "TransformChain"]
