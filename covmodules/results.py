"""The result of a fit: estimates, standard errors, BLUE, BLUPs, predictions and a summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from . import inference
from .base import CovarianceModule
from .distributed import ShardedREML
from .model import MixedModel
from .natural import natural_params, natural_table
from .operators import Grouped, KroneckerProduct, Sum
from .reml import REML

__all__ = ["FitResult"]


@dataclass
class FitResult:
    """Estimates and diagnostics of a REML/ML fit (see :func:`covmodules.fit`).

    The model's registered parameters are left at the estimates. Everything here is on the
    CPU in float64: floats, NumPy arrays and pandas objects.
    """

    objective: REML
    free: torch.Tensor
    state: object
    ai: torch.Tensor
    converged: bool
    iterations: int
    optimizer: str
    boundary: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    unidentified: list[str] = field(default_factory=list)
    source: object = None        # the spec and data of a fit built from them (predict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- likelihood
    @property
    def model(self):
        return self.objective.model

    @property
    def solver(self) -> str:
        """Name of the solver that factorised ``V`` (``"dense"``, ``"kronecker"``, ...)."""
        return self.objective.solver.name

    @property
    def method(self) -> str:
        return self.objective.method.upper()

    @property
    def loglik(self) -> float:
        """Log-likelihood on R's scale (REML or ML as fitted)."""
        return -float(self.state.neg_loglik)

    @property
    def n(self) -> int:
        return self.objective.n

    @property
    def num_params(self) -> int:
        """Free covariance parameters plus fixed effects (lme4's degrees of freedom)."""
        return self.model.num_free_params + self.objective.p

    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.num_params

    @property
    def bic(self) -> float:
        return -2 * self.loglik + math.log(self.n) * self.num_params

    # ---------------------------------------------------------- covariance params
    @property
    def params(self) -> dict[str, float]:
        """Every covariance parameter by hierarchical name, on the natural scale, then the
        variances ``sigma^2[i]``, SDs ``sd[i]`` and correlations ``rho[i,j]`` of each
        structure estimated through a Cholesky factor or loadings (an unstructured ``G``:
        ``Subject/terms/rho[1,0]``), see :mod:`covmodules.natural`."""
        return natural_params(self.model, self.free)

    @property
    def param_cov(self) -> np.ndarray:
        """Covariance of the free-scale estimates: the inverse AI matrix (NaN rows for boundary
        parameters and for those the AI matrix does not identify, see :attr:`unidentified`)."""
        names = self.model.free_param_names
        excluded = set(self.boundary) | set(self.unidentified)
        active = [i for i, n in enumerate(names) if n not in excluded]
        cov = np.full((len(names), len(names)), np.nan)
        if active:
            sub = self.ai[active][:, active]
            cov[np.ix_(active, active)] = torch.linalg.pinv(sub, hermitian=True).cpu().numpy()
        return cov

    @property
    def std_errors(self) -> dict[str, float]:
        """Standard errors of the free parameters on the natural scale (delta method)."""
        d = self.model.trans_grad(self.free).abs().cpu().numpy()
        se = d * np.sqrt(np.clip(np.diag(self.param_cov), 0, None))
        return dict(zip(self.model.free_param_names, se.tolist()))

    def param_table(self, raw: bool = False) -> pd.DataFrame:
        """Free covariance parameters on the natural scale: estimate, standard error (delta
        method), boundary flag. An unstructured ``G`` shows its variances, SDs and
        correlations; ``raw=True`` shows the estimated parameters themselves (``L[i,j]``)."""
        if not raw:
            return natural_table(self.model, self.free, self.param_cov, self.boundary)
        se = self.std_errors
        rows = [(name, self.params[name], se[name], name in self.boundary)
                for name in self.model.free_param_names]
        return pd.DataFrame(rows, columns=["name", "estimate", "std_error", "boundary"]
                            ).set_index("name")

    # -------------------------------------------------------------- fixed effects
    @property
    def fixed_effects(self) -> pd.DataFrame:
        """lmerTest's table: GLS estimates, standard errors, Satterthwaite degrees of
        freedom ``df``, ``t`` values and two-sided p-values (``t`` distribution with ``df``;
        see :func:`covmodules.inference.satterthwaite`)."""
        if "t_tests" not in self._cache:
            self._cache["t_tests"] = inference.t_tests(self)
        return self._cache["t_tests"].copy()

    def confint(self, method: str = "profile", level: float = 0.95, **kwargs) -> pd.DataFrame:
        """Confidence intervals as lme4's ``confint``: ``"profile"`` (default) the
        likelihood-ratio intervals of the SDs, correlations and fixed effects from the
        profile of the *ML* deviance, as lme4 does also for a REML fit (which is refitted by
        ML first; see :func:`covmodules.profile.profile_confint`, whose keywords pass
        through); ``"wald"`` ``β̂ ± z SE`` of the fixed effects."""
        level = inference.check_level(level)
        if method == "wald":
            return inference.wald_confint(self, level)
        if method == "profile":
            from .profile import profile_confint
            return profile_confint(self, level, **kwargs)
        raise ValueError(f"method must be 'profile' or 'wald', got {method!r}")

    def varcorr(self) -> pd.DataFrame:
        """Variances, SDs and correlations of every random term and the residual
        (lme4's ``as.data.frame(VarCorr(fit))``; :func:`covmodules.inference.varcorr`)."""
        return inference.varcorr(self)

    def ranef(self, condvar: bool = True) -> pd.DataFrame:
        """BLUPs by term and level with their conditional SDs (lme4's ``ranef(fit, condVar =
        TRUE)``; :func:`covmodules.inference.ranef`)."""
        return inference.ranef(self, condvar)

    def simulate(self, nsim: int = 1, seed: int | None = None) -> pd.DataFrame:
        """``nsim`` responses simulated from the fit, new random effects and residuals in
        each (lme4's ``simulate``; :func:`covmodules.inference.simulate`)."""
        return inference.simulate(self, nsim, seed)

    def random_effects(self, residual: bool = False) -> pd.DataFrame:
        """lme4's "Random effects" table: per term, the variance, standard deviation and
        correlations of the effects of one level (the leading ``len(terms)`` block of ``G``,
        see :func:`term_covariances`; ``G`` itself is not formed); with ``residual`` the
        ``Residual`` row too (the summary shows it)."""
        model = self.model
        if not isinstance(model, MixedModel):
            return pd.DataFrame(columns=["group", "name", "variance", "std_dev"])
        rows = []
        with torch.no_grad():
            for name, G in term_covariances(model, self.free).items():
                terms = term_labels(model, name)
                G = G.to(torch.float64)
                sd = G.diagonal().clamp(min=0).sqrt()
                corr = G / torch.outer(sd, sd).clamp(min=1e-300)
                for i, term in enumerate(terms):
                    row = {"group": name, "name": term, "variance": float(G[i, i]),
                           "std_dev": float(sd[i])}
                    row.update({f"corr {terms[j]}": float(corr[i, j]) for j in range(i)})
                    rows.append(row)
        if residual:
            var = inference.residual_variance(model, self.free)
            rows.append({"group": "Residual", "name": "", "variance": var,
                         "std_dev": math.sqrt(max(var, 0.0))})
        return pd.DataFrame(rows)

    # -------------------------------------------------------- BLUPs, predictions
    @property
    def sharded(self) -> bool:
        """Whether the fit is a :class:`~covmodules.distributed.ShardedREML`'s."""
        return isinstance(self.objective, ShardedREML)

    def shard(self, i: int) -> "FitResult":
        """The fit seen from shard ``i`` of a sharded fit: its own rows, the global ``b̂``
        and the shard's ``P y`` (exact for its BLUPs, which depend on no other shard)."""
        if not self.sharded:
            raise ValueError("shard(i) needs a sharded fit (a ShardedREML objective)")
        objective = self.objective.shard(i)
        objective.model.set_free_params(self.free)
        return replace(self, objective=objective, state=self.state.shards[i])

    def blups(self) -> dict[str, pd.DataFrame]:
        """BLUPs ``G Zᵀ P y`` of each random term, one row per level when levels are known."""
        model = self.model
        if not isinstance(model, MixedModel) or self.sharded:
            return {}
        out = {}
        with torch.no_grad():
            for name, u in self._blup_vectors().items():
                out[name] = _blup_frame(u.cpu().numpy(), model.levels.get(name),
                                        model.terms.get(name))
        return out

    def _blup_vectors(self) -> dict[str, torch.Tensor]:
        """``û = G Zᵀ P y`` per random term, through structured products (no dense ``Z``)."""
        model, Py = self.model, self.state.Py
        return {name: model._modules[name].matmul(
                    self.objective.term_sums(name, self.state).to(Py))[:, 0]
                for name in model.term_names}

    def fitted(self, conditional: bool = True) -> np.ndarray:
        """``X b̂`` (marginal) or ``X b̂ + Σ Z û`` (conditional) for the fitted data."""
        if self.sharded:
            raise ValueError("a sharded fit has no single data set: use result.shard(i) for "
                             "shard i's fitted values and BLUPs")
        X = self.objective.X.to(self.state.beta)
        out = X @ self.state.beta
        model = self.model
        if conditional and isinstance(model, MixedModel):
            with torch.no_grad():
                for name, u in self._blup_vectors().items():
                    out = out + model.z_matmul(name, u[:, None].to(out))[:, 0]
        return out.cpu().numpy()

    def predict(self, newdata: pd.DataFrame | None = None, allow_new_levels: bool = True,
                include_random: bool = True) -> np.ndarray:
        """Predictions for ``newdata`` (default: the fitted data) with lme4's semantics; see
        :mod:`covmodules.prediction`."""
        from .prediction import predict
        return predict(self, newdata, allow_new_levels, include_random)

    def residuals(self, conditional: bool = True) -> np.ndarray:
        """``y`` minus :meth:`fitted`."""
        return self.objective.y.to(torch.float64).cpu().numpy() - self.fitted(conditional)

    # -------------------------------------------------------------------- report
    def summary(self) -> str:
        """A table a lme4 or statsmodels user reads at a glance."""
        status = "converged" if self.converged else "NOT converged"
        lines = [
            f"Linear mixed model fit by {self.method} ({self.optimizer}, solver: {self.solver})",
            f"  n = {self.n}, p = {self.objective.p}, covariance parameters = "
            f"{self.model.num_free_params}; {status} in {self.iterations} iterations",
            f"  logLik = {self.loglik:.4f}   AIC = {self.aic:.4f}   BIC = {self.bic:.4f}",
        ]
        if self.boundary:
            lines.append(f"  singular fit: {', '.join(self.boundary)} at the boundary")
        if self.unidentified:
            lines.append(f"  not identified (singular AI matrix, standard errors NaN): "
                         f"{', '.join(self.unidentified)}")
        if self.objective.dropped:
            lines.append(f"  dropped aliased fixed-effect columns: {self.objective.dropped}")
        random = self.random_effects(residual=True)
        if len(random):
            lines += ["", "Random effects:",
                      random.to_string(index=False, float_format=_fmt, na_rep="")]
        table = self.param_table()
        lines += ["", "Covariance parameters:", table.to_string(float_format=_fmt)]
        raw = self.param_table(raw=True)
        raw = raw[~raw.index.isin(table.index)]
        if len(raw):
            lines += ["", "  as estimated (Cholesky factors, loadings):",
                      raw.to_string(float_format=_fmt)]
        lines += ["", "Fixed effects:", self.fixed_effects.to_string(
            float_format=_fmt, formatters={"p_value": inference.format_pvalue})]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def term_labels(model: MixedModel, name: str) -> list[str]:
    """The names of the ``k`` effects per level of random term ``name``."""
    return list(model.terms.get(name) or ["(Intercept)"])


def term_covariances(model: MixedModel, free=None) -> dict[str, torch.Tensor]:
    """Per random term, the ``k × k`` covariance of the effects of one level (``k`` its
    number of terms): the leading block of ``G`` at free-scale ``free`` (the registered
    parameters by default), by :func:`leading_block`, so its cost does not grow with ``q²``."""
    with torch.no_grad():
        nat = model.build_params(free)
        return {name: leading_block(G, part, len(term_labels(model, name)))
                for name, G, part in model._terms(nat)}


def leading_block(module: CovarianceModule, nat: torch.Tensor, size: int) -> torch.Tensor:
    """The top-left ``size × size`` block of ``module`` at natural-scale parameters ``nat``.

    A Kronecker product, sum or grouped structure is reduced to blocks of its operands; any
    other module multiplies ``size`` unit columns by its own product, which is structured for
    scalar, identity and design matrices. The full matrix is formed only for a module whose
    product is dense."""
    rows, cols = (min(size, n) for n in module.shape)
    return _block(module, nat, rows, cols)


def _block(module: CovarianceModule, nat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if isinstance(module, KroneckerProduct):
        (a, b), (na, nb) = module.operand_modules, module._split(nat)
        n1, n2 = b.shape        # row i of A ⊗ B is row i // n1 of A and i % n1 of B
        A = _block(a, na, -(-rows // n1), -(-cols // n2))
        B = _block(b, nb, min(rows, n1), min(cols, n2))
        return torch.kron(A, B)[:rows, :cols]
    if isinstance(module, Sum):
        return sum(_block(op, part, rows, cols)
                   for op, part in zip(module.operand_modules, module._split(nat)))
    if isinstance(module, Grouped):
        S = module.operand_modules[0]._evaluate(nat)
        p, g = module.positions, module.group_codes
        same = g[:rows, None] == g[None, :cols]
        return S[p[:rows, None], p[None, :cols]] * same.to(S)
    E = torch.eye(module.shape[1], cols, dtype=nat.dtype, device=nat.device)
    return module._matmul(nat, E)[:rows]


def _blup_frame(u: np.ndarray, levels, terms) -> pd.DataFrame:
    if levels is not None and len(levels) and u.size % len(levels) == 0:
        k = u.size // len(levels)
        columns = list(terms) if terms is not None and len(terms) == k else list(range(k))
        return pd.DataFrame(u.reshape(len(levels), k), index=list(levels), columns=columns)
    return pd.DataFrame({"blup": u})
