r"""Multi-environment field trials (ASReml's standard model) from plot data.

:func:`multi_environment` builds, from one row per plot (environment, genotype, row, column,
response), the model

.. math::

    y = X b + Z u + e, \qquad u \sim N(0, I_L \otimes \Sigma), \qquad
    e \sim N\big(0, \operatorname{diag}_e(\sigma^2_e\,\mathrm{AR1}(\rho^r_e) \otimes
    \mathrm{AR1}(\rho^c_e) + \tau^2_e I)\big),

``u`` the genotype x environment effects (``Σ`` factor-analytic ``FA(k)``, unstructured or
diagonal over the ``E`` environments), one spatial field per trial (trials of any size), an
environment mean per trial in ``X`` (and, optionally, a linear trend along rows or columns per
trial and random row / column effects per trial). Each trial's grid is completed
(:func:`~covmodules.linalg.complete_grid`: a missing plot gets ``y = 0``, its own indicator
column and no genotype), so the fit equals that of the observed plots, and the ``met`` solver
(:mod:`covmodules.linalg.environments`) never forms an ``N x N`` matrix.
:func:`genotype_blups` gives each genotype's BLUP per environment with its prediction error
variance ``PEV = Var(û - u) = diag(G - G Zᵀ P Z G)``.

Example::

    >>> import pandas as pd
    >>> df = pd.DataFrame({"env": list("aaaabbbbb"), "genotype": list("xyyxxyzzy"),
    ...                    "row": [1, 1, 2, 2, 1, 1, 1, 2, 2], "col": [1, 2, 1, 2, 1, 2, 3, 1, 2],
    ...                    "y": [1.0, 2.0, 1.5, 0.5, 3.0, 2.5, 2.0, 2.2, 3.1]})
    >>> trial = multi_environment(df, sigma="diag")       # trial b misses plot (2, 3)
    >>> trial.shapes, trial.x_names
    ([(2, 2), (2, 3)], ['env[a]', 'env[b]', 'missing[b,9]'])
    >>> trial.model.free_param_names[:2]
    ['gxe/environments/sigma^2[0]', 'gxe/environments/sigma^2[1]']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .design import RandomDesign
from .linalg.kronecker import complete_grid
from .model import MixedModel
from .operators.block_diagonal import BlockDiagonal
from .operators.kronecker import KroneckerProduct
from .operators.sum import Sum
from .structures.ar1 import AR1Matrix
from .structures.block_design import BlockDesignMatrix
from .structures.diagonal import DiagonalMatrix
from .structures.factor_analytic import FactorAnalyticMatrix
from .structures.identity import IdentityMatrix
from .structures.scalar import ScalarMatrix
from .structures.unconstrained import UnconstrainedMatrix

__all__ = ["TrialData", "multi_environment", "genotype_blups", "simulate_trials"]

DTYPE = torch.float64


@dataclass
class TrialData:
    """A multi-environment model and its data in completed-grid order (trial by trial, each
    grid row-major); ``plots[i]`` is the data row of the input frame at grid row ``i``
    (``-1``: a missing plot)."""

    model: MixedModel
    y: torch.Tensor
    X: torch.Tensor
    x_names: list[str]
    environments: list
    genotypes: list
    shapes: list[tuple[int, int]]
    plots: np.ndarray


def _sigma(kind: str, E: int, k: int):
    if kind == "fa":
        return FactorAnalyticMatrix(E, k)
    if kind == "us":
        return UnconstrainedMatrix(E)
    if kind == "diag":
        return DiagonalMatrix(E)
    raise ValueError(f"sigma must be 'fa', 'us' or 'diag', got {kind!r}")


def _blocks(modules: dict):
    return BlockDiagonal(modules) if len(modules) > 1 else next(iter(modules.values()))


def multi_environment(df: pd.DataFrame, y: str = "y", env: str = "env",
                      genotype: str = "genotype", row: str = "row", col: str = "col",
                      sigma: str = "fa", k: int = 1, spatial: bool = True,
                      trend: str | None = None, row_effects: bool = False,
                      col_effects: bool = False) -> TrialData:
    """The model of the module docstring for plot data ``df``.

    Args:
        sigma: ``"fa"`` (``FA(k)``), ``"us"`` or ``"diag"``: ``Σ`` of the genotype x
            environment effects.
        spatial: each trial's residual ``AR1 ⊗ AR1 + nugget`` (else ``σ²_e I``).
        trend: ``"row"`` or ``"col"``: a linear trend along it per trial (fixed effects).
        row_effects, col_effects: random row / column effects, one variance per trial.
    """
    for name in (y, env, genotype, row, col):
        if name not in df.columns:
            raise ValueError(f"column {name!r} not in the data frame")
    if trend not in (None, "row", "col"):
        raise ValueError(f"trend must be None, 'row' or 'col', got {trend!r}")
    envs, genos = sorted(df[env].unique()), sorted(df[genotype].unique())
    E, L = len(envs), len(genos)
    code = {g: i for i, g in enumerate(genos)}
    parts, residual, random_rows, random_cols, shapes = [], {}, {}, {}, []
    for e, label in enumerate(envs):
        sub = df[df[env] == label]
        grid = complete_grid(sub[row].to_numpy(), sub[col].to_numpy(),
                             torch.tensor(sub[y].to_numpy(), dtype=DTYPE),
                             torch.zeros(len(sub), 0, dtype=DTYPE), [])
        m, n = grid.shape
        shapes.append((m, n))
        plots = np.full(m * n, -1)
        plots[grid.cells.numpy()] = sub.index.to_numpy()
        codes = np.zeros(m * n, dtype=np.int64)
        codes[grid.cells.numpy()] = [code[g] for g in sub[genotype]]
        parts.append((e, label, grid, plots, codes))
        key = f"env{e}"
        residual[key] = (Sum(field=KroneckerProduct(row=AR1Matrix(m), col=AR1Matrix(n)),
                             nugget=ScalarMatrix(m * n)) if spatial else ScalarMatrix(m * n))
        random_rows[key], random_cols[key] = ScalarMatrix(m), ScalarMatrix(n)
    N = sum(m * n for m, n in shapes)
    env_code = torch.cat([torch.full((g.y.shape[0],), e) for e, _, g, _, _ in parts])
    observed = torch.cat([torch.from_numpy(p >= 0) for *_, p, _ in parts])
    one_hot = torch.nn.functional.one_hot(env_code, E).to(DTYPE)
    columns, names = [one_hot], [f"env[{label}]" for label in envs]
    if trend is not None:
        pos = torch.cat([torch.arange(m * n) // n if trend == "row" else torch.arange(m * n) % n
                         for m, n in shapes]).to(DTYPE)
        columns.append(one_hot * pos[:, None])
        names += [f"{trend}_trend[{label}]" for label in envs]
    missing = (~observed).nonzero()[:, 0]
    M = torch.zeros(N, len(missing), dtype=DTYPE)
    M[missing, torch.arange(len(missing))] = 1
    columns.append(M)
    names += [f"missing[{envs[int(env_code[i])]},{i}]" for i in missing.tolist()]
    X = torch.cat(columns, 1)
    X[missing, :E * (2 if trend else 1)] = 0
    Z = RandomDesign((genotype,), [str(g) for g in genos], [f"env[{label}]" for label in envs],
                     torch.from_numpy(np.concatenate([c for *_, c in parts])),
                     one_hot * observed[:, None])
    random = {"gxe": (Z, KroneckerProduct(genotypes=IdentityMatrix(L),
                                          environments=_sigma(sigma, E, k)))}
    for flag, name, sizes, effects in ((row_effects, "row", [m for m, _ in shapes], random_rows),
                                       (col_effects, "col", [n for _, n in shapes], random_cols)):
        if flag:
            pos = torch.cat([torch.arange(m * n) // n if name == "row" else torch.arange(m * n) % n
                             for m, n in shapes])
            offset = torch.repeat_interleave(torch.tensor([0] + sizes[:-1]).cumsum(0),
                                             torch.tensor([m * n for m, n in shapes]))
            design = BlockDesignMatrix(pos + offset, observed[:, None].to(DTYPE), sum(sizes))
            random[name] = (design, _blocks(effects))
    model = MixedModel(random=random, residual=_blocks(residual))
    y_all = torch.cat([g.y for _, _, g, _, _ in parts])
    plots = np.concatenate([p for *_, p, _ in parts])
    return TrialData(model, y_all, X, names, envs, genos, shapes, plots)


def genotype_blups(result, trial: TrialData, chunk: int = 256) -> pd.DataFrame:
    """Each genotype's BLUP ``û = G Zᵀ P y`` per environment and its prediction error
    variance ``diag(G - G Zᵀ P Z G)`` (``chunk`` columns of ``Z G`` whitened at a time)."""
    model, state = result.model, result.state
    G = model._modules["gxe"]
    q = G.shape[0]
    with torch.no_grad():
        u = result._blup_vectors()["gxe"]
        pev = torch.empty(q, dtype=DTYPE)
        for start in range(0, q, chunk):
            eye = torch.zeros(q, min(chunk, q - start), dtype=DTYPE)
            eye[start + torch.arange(eye.shape[1]), torch.arange(eye.shape[1])] = 1
            GE = G.matmul(eye)
            ZG = model.z_matmul("gxe", GE)
            pev[start:start + eye.shape[1]] = GE[start:start + eye.shape[1]].diagonal() \
                - state.project(ZG).diagonal()
    index = pd.MultiIndex.from_product([trial.genotypes, trial.environments],
                                       names=["genotype", "environment"])
    return pd.DataFrame({"blup": u.cpu().numpy(), "pev": pev.cpu().numpy()}, index=index)


def simulate_trials(shapes, genotypes: int, k: int = 2, missing: float = 0.0, seed: int = 0):
    """Plot data of trials of the given ``(rows, cols)`` shapes from the model of the module
    docstring with ``FA(k)`` ``Σ``, and the true values: ``(df, truth)``.

    Every genotype is in every trial (replicated as the plots allow, placed at random);
    ``missing`` is the share of plots dropped at random.
    """
    g = torch.Generator().manual_seed(seed)
    E = len(shapes)

    def uniform(lo, hi, size):
        return lo + (hi - lo) * torch.rand(size, generator=g, dtype=DTYPE)

    Lam = 0.8 * torch.randn(E, k, generator=g, dtype=DTYPE)
    psi, mean = uniform(0.1, 0.4, E), 10 + 2 * torch.randn(E, generator=g, dtype=DTYPE)
    sigma2, rho_r, rho_c, tau2 = (uniform(0.5, 1.0, E), uniform(0.3, 0.7, E),
                                  uniform(0.2, 0.6, E), uniform(0.1, 0.3, E))
    u = torch.randn(genotypes, k, generator=g, dtype=DTYPE) @ Lam.T \
        + torch.randn(genotypes, E, generator=g, dtype=DTYPE) * psi.sqrt()
    frames = []
    for e, (m, n) in enumerate(shapes):
        def ar1(size, rho):
            i = torch.arange(size, dtype=DTYPE)
            return torch.linalg.cholesky(rho ** (i[:, None] - i[None, :]).abs())
        field = ar1(m, rho_r[e]) @ torch.randn(m, n, generator=g, dtype=DTYPE) \
            @ ar1(n, rho_c[e]).T
        geno = torch.arange(m * n) % genotypes
        geno = geno[torch.randperm(m * n, generator=g)]
        y = (mean[e] + u[geno, e] + sigma2[e].sqrt() * field.reshape(-1)
             + tau2[e].sqrt() * torch.randn(m * n, generator=g, dtype=DTYPE))
        keep = torch.rand(m * n, generator=g) >= missing
        cells = torch.arange(m * n)[keep]
        frames.append(pd.DataFrame({"env": f"E{e + 1:02d}", "genotype": geno[keep].numpy(),
                                    "row": (cells // n + 1).numpy(),
                                    "col": (cells % n + 1).numpy(), "y": y[keep].numpy()}))
    truth = {"Sigma": Lam @ Lam.T + torch.diag(psi), "psi": psi, "mean": mean,
             "sigma2": sigma2, "rho_row": rho_r, "rho_col": rho_c, "nugget": tau2}
    return pd.concat(frames, ignore_index=True), truth
