"""Small, identifiable mixed models over every fittable covariance structure and every solver.

Each :class:`ModelSpec` describes one model: a deterministic design (rows with group codes,
positions, covariates, grid cells), the true natural-scale parameters it is simulated from, and
``build(rows, y, solver)`` which makes a *fresh* model (at its default parameters, so a fit
starts from the library's data-driven start values) together with ``y`` and ``X`` in the
order that solver needs. Building from the raw rows means that a permutation of the rows or a
relabelling of the group levels goes through the same code a user's data would: group codes,
positions, ``Z`` rows, Kronecker grid completion.

``simulate(name)`` draws ``y = X b + chol(V) z`` from the model itself (a fixed
``torch.Generator`` seed), so the REML optimum is interior. Every ``X`` has the intercept in
column 0.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from covmodules import (Adapter, AR1Matrix, BlockDesignMatrix, CAR1Matrix,
                        CompoundSymmetricMatrix, CovariancePropagation, DesignMatrix,
                        DiagonalMatrix, DummyMatrix, EqualEntryMatrix, EquicorrelationMatrix,
                        FactorAnalyticMatrix, Gram, Grouped, HadamardProduct,
                        HeterogeneousCSMatrix, HeterogeneousToeplitzMatrix, IdentityMatrix,
                        KnownMatrix, KroneckerProduct, LowerTriangularMatrix, MixedModel,
                        ScalarMatrix, SimpleMatrix, Sum, ToeplitzMatrix, UnconstrainedMatrix)
from covmodules.linalg import complete_grid
from covmodules.transforms import ExpPow2, Identity

DTYPE = torch.float64
SEED = 20240611

#: structures that carry no parameters (designs, constants): nothing to estimate or rescale
PARAMETERLESS = {"IdentityMatrix", "FixedMatrix", "DesignMatrix", "BlockDesignMatrix",
                 "DummyMatrix"}

#: how each natural-scale parameter moves when ``y -> s y``: ``value * s ** power``. Keyed on
#: the leaf name without its index (``sigma^2[3]`` -> ``sigma^2``); see the structures'
#: docstrings: variances (``sigma^2``, ``psi``) scale as ``s²``, Cholesky / loading entries
#: (``L[i,j]`` of UnconstrainedMatrix and LowerTriangularMatrix, ``lambda[i,j]``) as ``s``,
#: correlations and MA coefficients (``rho``, ``phi``, ``theta[k]``, SimpleMatrix's ``c``) not
#: at all; the natural-scale summaries of a Cholesky / factor structure (``sigma^2[i]``,
#: ``sd[i]``, ``rho[i,j]``, see covmodules.natural) as variances, SDs and correlations. A
#: fixed parameter never moves.
SCALE_POWER = {"sigma^2": 2, "psi": 2, "L": 1, "lambda": 1, "rho": 0, "phi": 0, "theta": 0,
               "c": 0, "sd": 1}


def scale_power(name: str) -> int:
    leaf = name.rsplit("/", 1)[-1].split("[", 1)[0]
    if leaf not in SCALE_POWER:
        raise KeyError(f"no scale rule for parameter {name!r}: add its leaf to SCALE_POWER")
    return SCALE_POWER[leaf]


# ----------------------------------------------------------------------------- designs
def gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def longitudinal(subjects: int, times: int, seed: int, drop: float = 0.15) -> dict:
    """Rows of ``subjects`` x ``times`` with about ``drop`` of the cells missing (at least
    three rows per subject), sorted by subject and time: ``g`` (subject code), ``t`` (time
    index), ``x`` (a covariate)."""
    g = gen(seed)
    keep = torch.rand(subjects, times, generator=g) >= drop
    keep[:, :3] |= keep.sum(1, keepdim=True) < 3
    sub, t = keep.nonzero(as_tuple=True)
    n = sub.numel()
    return {"g": sub, "t": t, "x": torch.randn(n, generator=g, dtype=DTYPE)}


def crossed(a_levels: int, b_levels: int, seed: int) -> dict:
    """Every ``(a, b)`` combination once: ``g`` (factor a), ``h`` (factor b), ``x``."""
    a = torch.arange(a_levels).repeat_interleave(b_levels)
    b = torch.arange(b_levels).repeat(a_levels)
    return {"g": a, "h": b, "x": torch.randn(a.numel(), generator=gen(seed), dtype=DTYPE)}


def grid(m: int, k: int, seed: int) -> dict:
    """A complete ``m x k`` field in row-major order: ``row``, ``col``, ``x``."""
    row = torch.arange(m).repeat_interleave(k)
    col = torch.arange(k).repeat(m)
    return {"row": row, "col": col, "x": torch.randn(m * k, generator=gen(seed), dtype=DTYPE)}


def design_x(*columns: torch.Tensor) -> torch.Tensor:
    n = columns[0].shape[0]
    return torch.stack([torch.ones(n, dtype=DTYPE), *(c.to(DTYPE) for c in columns)], 1)


def block_z(codes: torch.Tensor, values: torch.Tensor, levels: int) -> BlockDesignMatrix:
    return BlockDesignMatrix(codes.long(), values.to(DTYPE), levels)


def one_hot(codes: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(codes.long(), levels).to(DTYPE)


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ModelSpec:
    """One model of the catalogue (see the module docstring)."""

    name: str
    solvers: tuple[str, ...]              # every solver that applies to it
    rows: Callable[[], dict]              # the design, sorted
    build: Callable                       # (rows, y, solver) -> (model, y, X)
    truth: dict                           # natural-scale parameters to simulate from
    beta: tuple                           # true fixed effects (intercept first)
    factors: dict = field(default_factory=dict)   # row key -> levels, for relabelling
    # random term -> (row key of its grouping factor, columns per level), for BLUP checks
    terms: dict = field(default_factory=dict)
    noise_seed: int = 0                   # seed of the simulated errors


def _slope_model(name, G_of, truth, **extra):
    """``y ~ 1 + t + (1 + t | g)`` with ``G = I_L ⊗ S``, ``S = G_of()`` (2 x 2); all slope
    models share one design."""
    L, T = 16, 5

    def rows():
        return longitudinal(L, T, seed=20)

    def build(r, y, solver):
        slope = r["t"].to(DTYPE) - (T - 1) / 2
        Z = block_z(r["g"], torch.stack([torch.ones_like(slope), slope], 1), L)
        G = KroneckerProduct(level=IdentityMatrix(L), cov=G_of())
        model = MixedModel(random={"g": (Z, G)}, residual=ScalarMatrix(r["g"].numel()))
        return model, y, design_x(slope)

    return ModelSpec(name, ("dense", "grouped", "woodbury", "mme", "sufficient"), rows, build,
                     truth, beta=(1.0, 0.5), factors={"g": L}, terms={"g": ("g", 2)}, **extra)


def _simple_fn(theta):
    """``sigma^2 [[1, c], [c, 1 + c²]]`` (SimpleMatrix's docstring example)."""
    one = torch.ones((), dtype=theta.dtype)
    return theta[0] * torch.stack([torch.stack([one, theta[1]]),
                                   torch.stack([theta[1], 1 + theta[1] ** 2])])


def _simple():
    return SimpleMatrix(_simple_fn, (2, 2), {"sigma^2": (0.0, ExpPow2()), "c": (0.0, Identity())})


def _adapter():
    """``σ² [[1, ρ], [ρ, 1]]`` with the equicorrelation's free value ``2 θ`` (torch-openreml's
    Adapter; ``theta`` is unitless)."""
    specs = {"theta": {"fixed": False, "default": torch.tensor([0.0]), "trans": Identity()}}
    return HadamardProduct(scale=ScalarMatrix(1),
                           corr=Adapter(EquicorrelationMatrix(2), specs, lambda t: 2 * t))


def _scalar_intercept(name="scalar_intercept", design=None):
    """``y ~ 1 + x + (1 | g)``; ``design(codes, L)`` makes ``Z`` (a block design by default)."""
    L, T = 12, 5

    def build(r, y, solver):
        Z = (block_z(r["g"], torch.ones(r["g"].numel(), 1), L) if design is None
             else design(r["g"], L))
        model = MixedModel(random={"g": (Z, ScalarMatrix(L))},
                           residual=ScalarMatrix(r["g"].numel()))
        return model, y, design_x(r["x"])

    return ModelSpec(name, ("dense", "grouped", "woodbury", "mme"),
                     lambda: longitudinal(L, T, seed=1), build,
                     {"g/sigma^2": 0.8, "residual/sigma^2": 0.5}, beta=(2.0, -1.0),
                     factors={"g": L}, terms={"g": ("g", 1)})


def _environments():
    """Genotype x environment effects ``I_L ⊗ Σ`` (``Σ`` unstructured over 3 environments),
    2 replicates of every genotype in every environment: the ``met`` solver's environment term
    (split into one block per environment when the rows are grouped by environment, one block
    when a permutation interleaves them)."""
    L, E, reps = 20, 3, 2

    def rows():
        e = torch.arange(E).repeat_interleave(L * reps)
        g = torch.arange(L).repeat_interleave(reps).repeat(E)
        return {"g": g, "e": e, "x": torch.randn(e.numel(), generator=gen(21), dtype=DTYPE)}

    def build(r, y, solver):
        Z = block_z(r["g"], one_hot(r["e"], E), L)
        G = KroneckerProduct(genotypes=IdentityMatrix(L), env=UnconstrainedMatrix(E))
        model = MixedModel(random={"gxe": (Z, G)}, residual=ScalarMatrix(r["g"].numel()))
        return model, y, design_x(r["x"])

    truth = {"gxe/env/L[0,0]": 1.0, "gxe/env/L[1,0]": 0.5, "gxe/env/L[1,1]": 0.8,
             "gxe/env/L[2,0]": 0.3, "gxe/env/L[2,1]": 0.2, "gxe/env/L[2,2]": 0.7,
             "residual/sigma^2": 0.4}
    return ModelSpec("environments_us", ("dense", "woodbury", "mme", "met"), rows, build,
                     truth, beta=(1.0, 0.5), factors={"g": L}, terms={"gxe": ("g", E)})


def _known_relationship(levels: int) -> torch.Tensor:
    i = torch.arange(levels, dtype=DTYPE)
    return 0.5 ** (i[:, None] - i[None, :]).abs() + 0.1 * torch.eye(levels, dtype=DTYPE)


def _known():
    """Random intercepts with a known relationship matrix ``K`` among the levels."""
    L, T = 15, 4
    K = _known_relationship(L)

    def build(r, y, solver):
        # K follows a relabelling of the levels: K'[pi(a), pi(b)] = K[a, b]
        original = r.original_of("g", L)
        Kp = K[original][:, original]
        model = MixedModel(random={"g": (one_hot(r["g"], L), KnownMatrix(Kp))},
                           residual=ScalarMatrix(r["g"].numel()))
        return model, y, design_x(r["x"])

    return ModelSpec("known_intercept", ("dense", "woodbury"),
                     lambda: longitudinal(L, T, seed=2), build,
                     {"g/sigma^2": 1.0, "residual/sigma^2": 0.4}, beta=(1.0, 0.3),
                     factors={"g": L}, terms={"g": ("g", 1)})


def _crossed():
    """Two crossed random intercepts ``(1 | a) + (1 | b)`` (not nested: no grouped solver)."""
    A, B = 8, 6

    def build(r, y, solver):
        model = MixedModel(random={"a": (DesignMatrix(r["g"].tolist()), ScalarMatrix(A)),
                                   "b": (DesignMatrix(r["h"].tolist()), ScalarMatrix(B))},
                           residual=ScalarMatrix(r["g"].numel()))
        return model, y, design_x(r["x"])

    return ModelSpec("crossed_intercepts", ("dense", "woodbury", "mme", "sufficient"),
                     lambda: crossed(A, B, seed=3), build,
                     {"a/sigma^2": 1.0, "b/sigma^2": 0.6, "residual/sigma^2": 0.3},
                     beta=(0.5, 1.0), factors={"g": A, "h": B},
                     terms={"a": ("g", 1), "b": ("h", 1)})


def _grouped_residual(name, S_of, truth, subjects, times, *, random=False,
                      extra=None, seed=0):
    """``y ~ 1 + x`` with ``R = Grouped(S)`` over subjects at time positions ``t`` (plus a
    random intercept when ``random``, or ``+ extra(n)`` added to the residual)."""

    def build(r, y, solver):
        n = r["g"].numel()
        R = Grouped(time=S_of(), groups=r["g"], positions=r["t"])
        if extra is not None:
            R = Sum(within=R, nugget=extra(n))
        terms = {}
        if random:
            terms = {"g": (block_z(r["g"], torch.ones(n, 1), subjects), ScalarMatrix(subjects))}
        return MixedModel(random=terms, residual=R), y, design_x(r["x"])

    return ModelSpec(name, ("dense", "grouped"),
                     lambda: longitudinal(subjects, times, seed=seed), build, truth,
                     beta=(1.0, 0.7), factors={"g": subjects},
                     terms={"g": ("g", 1)} if random else {})


CAR1_TIMES = [0.0, 0.5, 1.5, 2.0, 3.5, 5.0]


def _kronecker(name, operands, truth, m, k, seed):
    """``y ~ 1 + x`` on an ``m x k`` field, ``V = A ⊗ B + σ² I``. The Kronecker solver needs
    grid order (rows through :func:`complete_grid`); the dense path takes the rows in any order
    as ``P (A ⊗ B + σ² I) Pᵀ`` with ``P`` the row -> cell incidence."""

    def core():
        A, B = operands()
        return Sum(field=KroneckerProduct(row=A, col=B), nugget=ScalarMatrix(m * k))

    def build(r, y, solver):
        X = design_x(r["x"])
        if solver == "kronecker":
            g = complete_grid(r["row"].numpy(), r["col"].numpy(), y, X, shape=(m, k))
            assert g.X.shape[1] == X.shape[1], "the grid is complete"
            return core(), g.y, g.X
        P = one_hot(r["row"] * k + r["col"], m * k)
        return CovariancePropagation(P=P, grid=core()), y, X

    return ModelSpec(name, ("dense", "kronecker"), lambda: grid(m, k, seed), build,
                     truth, beta=(1.0, 0.5))


#: seeds of the simulated errors, chosen so that AI-REML and L-BFGS agree on an interior
#: optimum near the truth (every estimate within 2 standard errors, no parameter near 0)
NOISE_SEEDS = {"crossed_intercepts": 1, "environments_us": 1, "grouped_diagonal_intercept": 2,
               "grouped_factor_analytic": 1, "kron_ar1_equicorrelation": 2,
               "kron_unstructured_ar1": 17}


def catalogue() -> list[ModelSpec]:
    return [dataclasses.replace(spec, noise_seed=NOISE_SEEDS.get(spec.name, 0))
            for spec in _catalogue()]


def _catalogue() -> list[ModelSpec]:
    us_slope = {"g/cov/L[0,0]": 1.0, "g/cov/L[1,0]": 0.4, "g/cov/L[1,1]": 0.7,
                "residual/sigma^2": 0.5}
    return [
        _scalar_intercept(),
        _slope_model("unstructured_slope", lambda: UnconstrainedMatrix(2), us_slope),
        _slope_model("diagonal_slope", lambda: DiagonalMatrix(2),
                     {"g/cov/sigma^2[0]": 1.0, "g/cov/sigma^2[1]": 0.5,
                      "residual/sigma^2": 0.5}),
        _slope_model("lowertri_gram_slope",
                     lambda: Gram(L=LowerTriangularMatrix(2, order="col"), gram_type="xxt"),
                     {"g/cov/L/L[0,0]": 1.0, "g/cov/L/L[1,0]": 0.4, "g/cov/L/L[1,1]": 0.7,
                      "residual/sigma^2": 0.5}),
        _slope_model("simple_slope", _simple,
                     {"g/cov/sigma^2": 0.8, "g/cov/c": 0.5, "residual/sigma^2": 0.5}),
        _slope_model("adapter_slope", _adapter,
                     {"g/cov/scale/sigma^2": 0.8, "g/cov/corr/theta": 0.2,
                      "residual/sigma^2": 0.5}),
        _scalar_intercept("dummy_intercept", lambda codes, L: DummyMatrix(codes)),
        _known(),
        _crossed(),
        _environments(),
        _grouped_residual("grouped_ar1", lambda: AR1Matrix(6),
                          {"residual/time/sigma^2": 1.0, "residual/time/rho": 0.6},
                          subjects=14, times=6, seed=4),
        _grouped_residual("grouped_car1", lambda: CAR1Matrix(CAR1_TIMES),
                          {"residual/time/sigma^2": 1.0, "residual/time/phi": 0.5},
                          subjects=14, times=6, seed=5),
        _grouped_residual("grouped_cs", lambda: CompoundSymmetricMatrix(5),
                          {"residual/time/sigma^2": 1.2, "residual/time/rho": 0.4},
                          subjects=14, times=5, seed=6),
        _grouped_residual("grouped_toeplitz", lambda: ToeplitzMatrix(6, bands=2),
                          {"residual/time/sigma^2": 1.0, "residual/time/theta[1]": 0.6,
                           "residual/time/theta[2]": 0.3},
                          subjects=14, times=6, seed=7),
        _grouped_residual("grouped_diagonal_intercept", lambda: DiagonalMatrix(5),
                          {"g/sigma^2": 0.8, **{f"residual/time/sigma^2[{i}]": v for i, v in
                                                 enumerate([0.5, 1.0, 1.5, 0.7, 1.2])}},
                          subjects=14, times=5, random=True, seed=8),
        _grouped_residual("grouped_factor_analytic", lambda: FactorAnalyticMatrix(4, 1),
                          {**{f"residual/time/lambda[{i},0]": v for i, v in
                              enumerate([1.0, 0.8, 0.6, 0.9])},
                           **{f"residual/time/psi[{i}]": v for i, v in
                              enumerate([0.3, 0.4, 0.5, 0.3])}},
                          subjects=30, times=4, seed=9),
        _grouped_residual("grouped_equal_entry", lambda: EqualEntryMatrix(5),
                          {"residual/within/time/sigma^2": 0.8, "residual/nugget/sigma^2": 0.5},
                          subjects=12, times=5, extra=ScalarMatrix, seed=10),
        _grouped_residual("grouped_heterogeneous_cs", lambda: HeterogeneousCSMatrix(4),
                          {**{f"residual/time/sigma^2[{i}]": v for i, v in
                              enumerate([0.8, 1.2, 1.0, 1.5])}, "residual/time/rho": 0.5},
                          subjects=30, times=4, seed=14),
        _grouped_residual("grouped_heterogeneous_toeplitz",
                          lambda: HeterogeneousToeplitzMatrix(4),
                          {**{f"residual/time/sigma^2[{i}]": v for i, v in
                              enumerate([0.8, 1.2, 1.0, 1.5])},
                           "residual/time/rho[1]": 0.6, "residual/time/rho[2]": 0.4,
                           "residual/time/rho[3]": 0.2},
                          subjects=30, times=4, seed=15),
        _kronecker("kron_ar1_ar1", lambda: (AR1Matrix(8), AR1Matrix(6)),
                   {"field/row/sigma^2": 1.0, "field/row/rho": 0.6, "field/col/rho": 0.4,
                    "nugget/sigma^2": 0.3}, m=8, k=6, seed=11),
        _kronecker("kron_ar1_equicorrelation", lambda: (AR1Matrix(10), EquicorrelationMatrix(8)),
                   {"field/row/sigma^2": 1.0, "field/row/rho": 0.5, "field/col/rho": 0.3,
                    "nugget/sigma^2": 0.3}, m=10, k=8, seed=12),
        _kronecker("kron_unstructured_ar1", lambda: (UnconstrainedMatrix(3), AR1Matrix(30)),
                   {"field/row/L[0,0]": 1.0, "field/row/L[1,0]": 0.5, "field/row/L[2,0]": 0.3,
                    "field/row/L[1,1]": 0.9, "field/row/L[2,1]": 0.4, "field/row/L[2,2]": 0.7,
                    "field/col/rho": 0.5, "nugget/sigma^2": 0.2}, m=3, k=30, seed=13),
    ]


SPECS = {spec.name: spec for spec in catalogue()}


# ----------------------------------------------------------------------------- data
class Rows(dict):
    """Per-row tensors by name, plus ``original`` (factor -> original level of each new code,
    after a relabelling) for structures indexed by level."""

    def __init__(self, columns, original=None):
        super().__init__(columns)
        self.original = dict(original or {})

    def original_of(self, key: str, levels: int) -> torch.Tensor:
        return self.original.get(key, torch.arange(levels))


@dataclass(frozen=True)
class Data:
    rows: Rows
    y: torch.Tensor


def _set_truth(model, truth: dict) -> None:
    """Set the true values; names are matched on their suffix (the dense Kronecker path
    prefixes ``grid/``)."""
    names = model.param_names
    for key, value in truth.items():
        match = [n for n in names if n == key or n.endswith("/" + key)]
        assert len(match) == 1, f"{key!r} matches {match} among {names}"
        model.set_param(match[0], value)


@functools.cache
def simulate(name: str) -> Data:
    """``y = X b + chol(V) z`` from the model itself, at its true parameters."""
    spec = SPECS[name]
    rows = Rows(spec.rows())
    n = next(iter(rows.values())).shape[0]
    model, _, X = spec.build(rows, torch.zeros(n, dtype=DTYPE), "dense")
    _set_truth(model, spec.truth)
    with torch.no_grad():
        V = model().to(DTYPE)
    z = torch.randn(n, generator=gen(1000 + spec.noise_seed), dtype=DTYPE)
    y = X @ torch.tensor(spec.beta, dtype=DTYPE) + torch.linalg.cholesky(V) @ z
    return Data(rows, y)


def permute_rows(data: Data, perm: torch.Tensor) -> Data:
    """The same data with its rows in the order ``perm``."""
    rows = Rows({k: v[perm] for k, v in data.rows.items()}, data.rows.original)
    return Data(rows, data.y[perm])


def relabel(data: Data, maps: dict) -> Data:
    """Level codes ``c -> maps[key][c]`` for each grouping factor ``key`` (the inverse map is
    kept in ``rows.original`` for structures indexed by level, a known relationship matrix)."""
    rows = Rows(data.rows, data.rows.original)
    for key, pi in maps.items():
        rows[key] = pi[rows[key]]
        rows.original[key] = torch.argsort(pi)
    return Data(rows, data.y)
