"""Natural-scale output: variances, SDs and correlations where the parameters are not.

An unstructured covariance is estimated through its Cholesky factor (``L[i,j]``) and a
factor-analytic one through loadings; what a statistician reads are the variances, standard
deviations and correlations of the matrix. A structure offers them through its
``natural_scale(nat)`` hook (``sigma^2[i]``, ``sd[i]``, ``rho[i,j]``); :func:`natural_params`
collects them over a whole model under hierarchical names, next to the raw parameters, and
:func:`natural_table` gives them delta-method standard errors.

Example::

    >>> import torch
    >>> from covmodules import UnconstrainedMatrix
    >>> from covmodules.natural import natural_params
    >>> G = UnconstrainedMatrix(2)
    >>> G.set_covariance(torch.tensor([[4.0, 2.0], [2.0, 9.0]]))
    >>> {k: round(v, 4) for k, v in natural_params(G).items()}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'L[0,0]': 2.0, 'L[1,0]': 1.0, 'L[1,1]': 2.8284, 'sigma^2[0]': 4.0, 'sigma^2[1]': 9.0,
     'sd[0]': 2.0, 'sd[1]': 3.0, 'rho[1,0]': 0.3333}
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .base import CovarianceModule

__all__ = ["covariance_summary", "derived_params", "natural_params", "natural_table",
           "NATURAL_ROLES"]

#: parameter roles already on the natural scale (the others are replaced in tables)
NATURAL_ROLES = ("variance", "correlation", "free")


def covariance_summary(V: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sigma^2[i]``, ``sd[i]`` and ``rho[i,j]`` (``i > j``, column by column) of ``V``."""
    n = V.shape[0]
    var = V.diagonal()
    sd = var.clamp(min=0).sqrt()
    out = {f"sigma^2[{i}]": var[i] for i in range(n)}
    out.update({f"sd[{i}]": sd[i] for i in range(n)})
    for j in range(n):
        for i in range(j + 1, n):
            out[f"rho[{i},{j}]"] = V[i, j] / (sd[i] * sd[j]).clamp(min=1e-300)
    return out


def _leaves(model: CovarianceModule):
    """``(prefix, module, indices into model.param_names)`` of modules with summaries."""
    index = {name: i for i, name in enumerate(model.param_names)}
    for path, module in model.named_modules():
        if (isinstance(module, CovarianceModule) and module.num_params
                and type(module).natural_scale is not CovarianceModule.natural_scale):
            prefix = path.replace(".", "/") + "/" if path else ""
            yield prefix, module, [index[prefix + name] for name in module.param_names]


def derived_params(model: CovarianceModule, free=None) -> dict[str, torch.Tensor]:
    """The natural-scale summaries of every structure of ``model`` at free-scale ``free``
    (default: the registered parameters), by hierarchical name; differentiable in ``free``."""
    nat = model.build_params(free)
    out = {}
    for prefix, module, idx in _leaves(model):
        out.update({prefix + k: v for k, v in module.natural_scale(nat[idx]).items()})
    return out


def natural_params(model: CovarianceModule, free=None) -> dict[str, float]:
    """Every parameter by name on its natural scale, then the summaries of
    :func:`derived_params` (variances, SDs, correlations of an unstructured ``G``)."""
    with torch.no_grad():
        nat = model.build_params(free)
        out = dict(zip(model.param_names, nat.tolist()))
        out.update({k: float(v) for k, v in derived_params(model, free).items()})
    return out


def natural_table(model: CovarianceModule, free: torch.Tensor, cov: np.ndarray,
                  boundary=()) -> pd.DataFrame:
    """The free parameters on the natural scale with delta-method standard errors from
    ``cov``, the covariance of the free-scale estimates (NaN rows: not estimated): a
    structure with summaries shows them in place of its Cholesky / loading parameters."""
    names = model.free_param_names
    free = free.detach().to(torch.float64)
    first, replaced = {}, set()          # first replaced parameter -> the summaries' names
    for prefix, module, _ in _leaves(model):
        raw = [prefix + spec.name for spec in module.param_specs
               if spec.role not in NATURAL_ROLES and prefix + spec.name in names]
        if raw:
            first[raw[0]] = [prefix + k for k in module.natural_scale(module.build_params())]
            replaced.update(raw)

    def values(f):
        own = dict(zip(model.param_names, model.build_params(f)))
        return torch.stack([own[n] for n in names] + list(derived_params(model, f).values()))

    position = {name: i for i, name in enumerate(names + list(derived_params(model, free)))}
    J = torch.autograd.functional.jacobian(values, free).cpu().numpy()
    value = values(free).detach().cpu().numpy()
    rows = [row for name in names
            for row in first.get(name, []) + ([] if name in replaced else [name])]
    out = []
    for name in rows:
        i = position[name]
        used = np.abs(J[i]) > 0
        sub = cov[np.ix_(used, used)]
        se = float(np.sqrt(max(J[i, used] @ sub @ J[i, used], 0.0))) if used.any() else 0.0
        at_boundary = any(names[j] in boundary for j in np.flatnonzero(used))
        out.append((name, float(value[i]), se, at_boundary))
    return pd.DataFrame(out, columns=["name", "estimate", "std_error", "boundary"]
                        ).set_index("name")
