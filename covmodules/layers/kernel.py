r"""Deep kernel: :math:`V = \Phi\Phi^T + \sigma^2 I`, the Gram of network features plus a nugget.

``V`` is a random term with ``Z = Φ`` and ``G = I`` over a scalar residual: the loss is the ML
loss of the residuals through the Woodbury factor
(:class:`~covmodules.linalg.woodbury.WoodburyFactor`, ``M = I + ΦᵀΦ / σ²``,
:math:`O(n d^2)`), with the solvers' "state forward, closed-form backward"
(:class:`~covmodules.linalg.base.NegLogLik`) over ``(σ², Φ)``. The network produces ``V``, so
besides ``∂/∂r = α = V⁻¹ r`` the backward gives the features theirs:

.. math:: \frac{\partial}{\partial \Phi} = V^{-1}\Phi - \alpha\,(\alpha^T \Phi)
          = \Phi M^{-1} / \sigma^2 - \alpha\,(\alpha^T \Phi), \qquad
          \frac{\partial}{\partial \sigma^2} = \tfrac12\left[\frac{n - d + \operatorname{tr}
          M^{-1}}{\sigma^2} - \alpha^T\alpha\right].
"""

from __future__ import annotations

import torch

from ..base import CovarianceModule
from ..linalg.base import NegLogLik, gls
from ..linalg.woodbury import WoodburyFactor
from ..operators.gram import Gram
from ..operators.sum import Sum
from ..structures.scalar import ScalarMatrix
from ..validation import as_data, check_size
from .base import CovarianceLayer, matrix64

__all__ = ["DeepKernel"]


class DeepKernel(CovarianceLayer):
    r"""Deep kernel: :math:`V = \Phi\Phi^T + \sigma^2 I`, the Gram of network features.

    ``Φ`` (``n x d``, the network's features) enters the loss with its gradient, so the network
    learns the kernel; ``nugget/sigma^2`` is the noise. A batch is indexed by its features:
    ``nll(y, mean, features)``. The loss is the ML loss through the Woodbury factor in
    ``O(n d²)``, its backward in closed form (module docstring); :meth:`batch_model` is the
    same ``V`` as a module, ``Sum(kernel=Gram(Φ, gram_type="xxt"), nugget=ScalarMatrix(n))``.
    The likelihood couples all rows, so the loss of a mini-batch is that batch's own marginal
    likelihood (a stochastic approximation).
    Prediction at new rows: ``f(x) + φ(x)ᵀ w``, ``w = Φᵀ V⁻¹ r`` from the training data.

    Example::

        >>> import torch
        >>> from covmodules import DeepKernel
        >>> layer = DeepKernel(num_features=2)
        >>> phi = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]])    # network features
        >>> y = torch.tensor([1.0, 2.0, 0.0])
        >>> V = layer.batch_model(phi)()
        >>> ref = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=V.dtype), V)
        >>> torch.isclose(layer.nll(y, torch.zeros(3), phi), -ref.log_prob(y.double())).item()
        True
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = check_size(num_features, "num_features")
        self.nugget = ScalarMatrix(1)
        self.register_buffer("weights", torch.zeros(self.num_features, dtype=torch.float64))

    def _features(self, features, n: int | None) -> torch.Tensor:
        """``features`` as a finite float64 ``(n, num_features)`` matrix (any ``n`` if None)."""
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError("features must be a floating-point tensor")
        rows = "n" if n is None else n
        n = features.shape[0] if n is None and features.dim() == 2 else n
        if features.shape != (n, self.num_features):
            raise ValueError(f"features must have shape ({rows}, {self.num_features}), "
                             f"got {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or inf values")
        return features.to(torch.float64)

    def _index(self, n, features, *, whole):
        return (self._features(features, n),)

    def _state(self, r, values):
        """The GLS state of ``r`` (no fixed effects) at ``values = [σ², vec Φ]``."""
        s, phi = values[0], values[1:].reshape(r.shape[0], self.num_features)
        eye = torch.eye(self.num_features, dtype=phi.dtype, device=phi.device)
        return gls(WoodburyFactor(s.expand(r.shape[0]), phi, eye), r, r.new_zeros(r.shape[0], 0),
                   "ml")

    def _values(self, phi):
        """``[σ², vec Φ]``, differentiable in the nugget's parameters and ``Φ``."""
        return torch.cat([matrix64(self.nugget)[0], phi.reshape(-1)])

    @staticmethod
    def _cotangent(values, state):
        """``[∂/∂σ², vec ∂/∂Φ]`` of ``-l`` (module docstring)."""
        f, alpha = state.factor, state.Py
        s, phi = values[0], values[1:].reshape(f.n, -1)
        Minv = torch.cholesky_inverse(f.LM)
        trace = (f.n - phi.shape[1] + Minv.trace()) / s
        g_phi = phi @ Minv / s - torch.outer(alpha, alpha @ phi)
        return torch.cat([(0.5 * (trace - alpha @ alpha))[None], g_phi.reshape(-1)])

    def _neg_loglik(self, r, phi):
        fixed = r.detach()
        return NegLogLik.apply(self._values(phi), r, r.new_zeros(r.shape[0], 0),
                               lambda values: self._state(fixed, values), self._cotangent)

    def _store(self, r, phi):
        self.weights.copy_(phi.T @ self._state(r, self._values(phi)).Py)
        return self.weights.clone()

    def predict(self, mean, features) -> torch.Tensor:
        """``mean + φ(x)ᵀ w``."""
        flat = as_data(mean, "mean", 1)
        phi = self._features(features, flat.shape[0])
        return mean + (phi @ self.weights.to(phi)).to(mean.dtype).reshape(mean.shape)

    def batch_model(self, features) -> CovarianceModule:
        """``Sum(kernel=Gram(Φ, gram_type="xxt"), nugget=ScalarMatrix(n))`` at the layer's nugget
        (Φ detached)."""
        phi = self._features(features, None).detach()
        model = Sum(kernel=Gram(phi, gram_type="xxt"), nugget=ScalarMatrix(phi.shape[0]))
        return self._mirror(model)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}"
