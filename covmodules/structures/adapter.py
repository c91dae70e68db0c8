r"""torch-openreml's Adapter: a covariance module re-parameterised by a map of new parameters.

.. math:: \mathbf{V}(\boldsymbol{\theta}) = \mathbf{A}\big(m(\boldsymbol{\theta})\big), \qquad
          \frac{\partial \mathbf{V}}{\partial \theta_k}
          = \sum_a \frac{\partial m_a}{\partial \theta_k}
            \frac{\partial \mathbf{A}}{\partial \phi_a}\Big|_{\phi = m(\theta)},

where ``A`` (the adaptee) is evaluated at free-scale parameters ``phi = m(theta)`` and, as in
torch-openreml, ``theta`` holds the adapter's *free* parameters (a fixed one is not passed to
``m`` and does not enter ``V``). The Jacobian is the chain rule through the adaptee's Jacobian and the map's (by the adapter's
``jacobian_method``). The adaptee's own registered parameters are not used, and it is not a
submodule (its parameters are not the adapter's); ``.to()`` moves it along.
"""

import torch

from ..base import CovarianceModule, Structure, jacobian
from ..param import spec_tuples
from ..transforms import Identity


class Adapter(Structure):
    r"""``adaptee(param_map(theta))`` for the parameters ``theta`` of ``param_specs`` (an
    upstream specification dict, identity transforms only; see
    :func:`~covmodules.simple_param_specs`). ``param_map`` takes the 1-D tensor of the free
    ``theta`` and returns the adaptee's free parameters.

    Example::

        >>> import torch
        >>> from covmodules import Adapter, AR1Matrix, simple_param_specs
        >>> V = Adapter(AR1Matrix(2), simple_param_specs(1), lambda t: torch.cat([t, t]))
        >>> V(torch.tensor([0.5], dtype=torch.float64))
        tensor([[2.7183, 0.6658],
                [0.6658, 2.7183]], dtype=torch.float64)
    """

    def __init__(self, adaptee, param_specs, param_map):
        super().__init__()
        if not isinstance(adaptee, CovarianceModule):
            raise TypeError(f"adaptee must be a CovarianceModule, got {type(adaptee).__name__}")
        if not callable(param_map):
            raise TypeError(f"param_map must be callable, got {type(param_map).__name__}")
        specs = spec_tuples(param_specs)
        if not all(isinstance(t, Identity) for _, _, t, _ in specs):
            raise ValueError("Adapter parameters take the identity transform only "
                             "(transform inside param_map instead)")
        self.__dict__["adaptee"] = adaptee
        self.param_map = param_map
        for name, default, transform, fixed in specs:
            if hasattr(self, name):
                raise ValueError(f"parameter name {name!r} is reserved")
            self.add_param(name, default, transform)
            if fixed:
                self.fix(name)

    @property
    def shape(self):
        return self.adaptee.shape

    def _mapped(self, theta: torch.Tensor) -> torch.Tensor:
        phi = self.param_map(theta)
        k = self.adaptee.num_free_params
        if not isinstance(phi, torch.Tensor) or tuple(phi.shape) != (k,):
            raise ValueError(f"param_map must return a tensor of shape ({k},) (the adaptee's "
                             f"free parameters), got {phi!r}")
        return phi

    def _evaluate(self, nat):
        a, theta = self.adaptee, nat[self._param_table().free_index]
        return a._evaluate(a._natural(a._full_raw(self._mapped(theta).to(nat.dtype))))

    def _jacobian(self, nat):
        free_index = self._param_table().free_index
        theta = nat.detach()[free_index]
        J = nat.new_zeros(self.num_params, *self.shape)
        J_a, _ = self.adaptee.grad(self._mapped(theta).to(nat.dtype))
        if J_a is not None and free_index:
            J_m = jacobian(self._mapped, theta, self.jacobian_method, self.jacobian_chunk_size)
            J[free_index] = torch.einsum("ak,aij->kij", J_m.to(nat.dtype), J_a.to(nat.dtype))
        return J

    def _apply(self, fn, *args, **kwargs):
        self.adaptee._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)
