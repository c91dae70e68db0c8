"""What every REML entry point checks before a fit, and how to turn a check off.

:func:`prepare` is the one validation path of :class:`~covmodules.reml.REML` (one data set)
and :class:`~covmodules.distributed.ShardedREML` (shards of whole groups, their sums
all-reduced over processes), hence of :func:`covmodules.fit`, the Lightning module and the
covariance layers' REML. On the data it always checks:

- ``y`` and ``X`` are real tensors (integers are converted; complex and boolean refused), of
  matching sizes, with no NaN or inf; they are taken as float64 on the model's device;
- aliased columns of ``X`` are dropped with a warning naming them, decided once on the
  Gram matrix ``XᵀX`` of the whole data (:func:`covmodules.design.independent_columns`);
- ``y`` is not fitted exactly by ``X``: the OLS residual norm is more than a few hundred
  rounding units of ``|y| + |X| |b|`` (else no variance is identified).

On the design (each check can be turned off with :class:`Checks`, lme4's ``lmerControl``
checks in brackets): every random term's grouping factor has more than one level
(``check.nlev.gtr.1``), fewer levels than observations (``check.nobs.vs.nlev``; also a
``Grouped`` structure with one row per group) and fewer random effects than observations
(``check.nobs.vs.nRE``); and ``V`` is not singular by construction: no two rows that every
additive piece of ``V`` treats alike (two rows of a group at one position of a ``Grouped``
structure, a repeated time of a ``CAR1Matrix``) unless a diagonal term separates them.

Example::

    >>> import torch
    >>> from covmodules import MixedModel, ScalarMatrix, fit
    >>> Z = torch.eye(4, dtype=torch.float64)                 # one row per level
    >>> model = MixedModel(random={"g": (Z, ScalarMatrix(4))}, residual=ScalarMatrix(4))
    >>> y = torch.tensor([1.0, 3.0, 2.0, 5.0], dtype=torch.float64)
    >>> fit(model, y)
    Traceback (most recent call last):
    ...
    ValueError: random term 'g' has 4 levels for 4 observations (one row per level), so its variance is confounded with the residual's (lme4: check.nobs.vs.nlev); it has 4 random effects (4 levels x 1) for 4 observations, so its covariance and the residual variance are not identified (lme4: check.nobs.vs.nRE). Pass checks=Checks(obs_gt_levels=False, obs_gt_effects=False) to fit anyway
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from .base import CovarianceModule
from .design import independent_columns
from .linalg.base import additive_pieces
from .model import MixedModel
from .operators.grouped import Grouped
from .singular import check_distinct_rows, grouped_row_classes, identical_rows
from .validation import as_data

__all__ = ["Checks", "Data", "prepare", "identical_rows", "grouped_row_classes",
           "check_distinct_rows"]

# y counts as fitted exactly when |y - X b| <= EXACT_FIT (|y| + |X||b|): rounding level
EXACT_FIT = 256 * torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Checks:
    """The design checks run before a fit; all on by default (lme4's ``lmerControl`` names).

    Attributes:
        levels_gt_1: every random term's grouping factor has at least 2 levels
            (``check.nlev.gtr.1``).
        obs_gt_levels: every random term has fewer levels than observations, i.e. not one
            row per level (``check.nobs.vs.nlev``); a ``Grouped`` piece of ``V`` has fewer
            groups than rows (with one row per group only the diagonal of its structure
            enters ``V``).
        obs_gt_effects: every random term has fewer random effects (levels x effects per
            level) than observations, e.g. not groups of size 1 with a random slope
            (``check.nobs.vs.nRE``).
        singular_v: ``V`` has no two rows that every additive piece treats alike (singular
            for every parameter value), e.g. two rows of one group at the same position of a
            ``Grouped`` structure, or a repeated time of a ``CAR1Matrix``, without a nugget.

    Example::

        >>> Checks(obs_gt_levels=False)
        Checks(levels_gt_1=True, obs_gt_levels=False, obs_gt_effects=True, singular_v=True)
    """

    levels_gt_1: bool = True
    obs_gt_levels: bool = True
    obs_gt_effects: bool = True
    singular_v: bool = True


def as_checks(checks) -> Checks:
    """``checks`` as a :class:`Checks` (``None``: all on)."""
    if checks is None:
        return Checks()
    if not isinstance(checks, Checks):
        raise TypeError(f"checks must be a covmodules.checks.Checks, got "
                        f"{type(checks).__name__}")
    return checks


@dataclass
class Data:
    """Validated data of one or more parts: ``ys``, ``Xs`` (float64, aliased columns
    dropped), ``x_names`` (kept), ``dropped`` (names), the total ``n`` and the variance of the
    OLS residuals (the data's scale for start values)."""

    ys: list[torch.Tensor]
    Xs: list[torch.Tensor]
    x_names: list[str]
    dropped: list[str]
    n: int
    residual_variance: float


def prepare(parts: Sequence, x_names=None, checks: Checks | None = None,
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
            overlapping: bool = False) -> Data:
    """Check the data ``parts`` ``[(model, y, X), ...]`` and the design; drop aliased columns.

    ``X`` ``None`` is an intercept; ``x_names`` defaults to ``(Intercept)`` for it, else
    ``x0, x1, ...``. With ``reduce`` (the sum over processes, e.g. an all-reduce) the parts
    are shards of one data set: every decision is taken on the sums over all of them, so every
    process takes the same one; errors name the shard, and a process whose own shards are
    refused makes every process raise. ``overlapping``: the shards share levels (rows of a
    crossed design split in any way, level codes common to all), so a level is counted once.

    >>> from covmodules import ScalarMatrix
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
    >>> data = prepare([(ScalarMatrix(3), torch.tensor([1.0, 3.0, 4.0]), X)], ["a", "b"])
    >>> data.x_names, data.n, round(data.residual_variance, 6)
    (['a', 'b'], 3, 0.321429)
    """
    checks = as_checks(checks)
    sharded = reduce is not None
    total = reduce if sharded else (lambda t: t)
    local, error = [], None
    try:
        local = _check_parts(parts, checks, sharded)
    except (TypeError, ValueError) as err:
        if not sharded:
            raise
        error = err
    device = local[0][1].device if local else _device(parts)
    p = local[0][2].shape[1] if local else 0
    groupings = [_groupings(model) for model, _, _ in local]
    if sharded:
        _agree(total, error, p, len(groupings[0]) if local else 0, device)
    names = _names(x_names, parts[0][2] is None, p)

    # the whole data's sums: XᵀX, Xᵀy, 1ᵀX, yᵀy, n and the levels of each grouping
    first = total(sum(_data_sums(y.detach(), X.detach(), [g.levels for g in pieces])
                      for (_, y, X), pieces in zip(local, groupings)))
    G, b, xsum, (yty, n), levels = first.split([p * p, p, p, 2, len(groupings[0])])
    G, n = G.reshape(p, p), int(n)
    kept = independent_columns(G)
    dropped = [name for j, name in enumerate(names) if j not in kept]
    if dropped:
        warnings.warn(f"fixed-effect model matrix is rank deficient: dropping aliased "
                      f"column(s) {dropped}", stacklevel=3)
    if len(kept) >= n:
        raise ValueError(f"X has {len(kept)} independent columns for {n} observations")
    if overlapping:
        levels = _shared_levels(total, local, device)
    _check_groupings([g._replace(levels=int(v)) for g, v in zip(groupings[0], levels)], n,
                     checks)

    # OLS on the kept columns; one refinement step makes the residuals exact to rounding
    ys, Xs = [y for _, y, _ in local], [X[:, kept] for _, _, X in local]
    k = len(kept)
    L = torch.linalg.cholesky(G[kept][:, kept])
    beta = torch.cholesky_solve(b[kept][:, None], L)[:, 0]
    second = total(sum(_residual_sums(y.detach(), X.detach(), beta) for y, X in zip(ys, Xs)))
    Xtr, (rtr, rsum, scale2) = second.split([k, 3])
    delta = torch.cholesky_solve(Xtr[:, None], L)[:, 0]
    rss, rsum = float(rtr - Xtr @ delta), float(rsum - xsum[kept] @ delta)
    if rss <= EXACT_FIT ** 2 * float(scale2):
        raise ValueError(
            f"y is fitted exactly by the {k} column(s) of X (residual sum of squares 0 up to "
            f"rounding: |y - X b| = {max(rss, 0.0) ** 0.5:.3g} for |y| = "
            f"{float(yty) ** 0.5:.3g}), so no variance is identified; check the response, or "
            "drop the columns of X that reproduce it")
    variance = (rss - rsum ** 2 / n) / (n - 1) if n > 1 else rss
    if not variance > EXACT_FIT * rss / n:      # constant residuals (X without an intercept)
        variance = rss / n
    return Data(ys, Xs, [names[j] for j in kept], dropped, n, variance)


def _check_parts(parts, checks: Checks, sharded: bool) -> list:
    out = []
    for i, part in enumerate(parts):
        try:
            if not (isinstance(part, (tuple, list)) and len(part) == 3):
                raise TypeError(f"a shard must be a (model, y, X) triple, got "
                                f"{type(part).__name__}")
            out.append(_check_part(*part, checks))
        except (TypeError, ValueError) as err:
            if not sharded:
                raise
            raise type(err)(f"shard {i}: {err}") from None
    widths = {X.shape[1] for _, _, X in out}
    if len(widths) > 1:
        raise ValueError(f"every shard's X needs the same columns, got widths {widths}")
    return out


def _check_part(model, y, X, checks: Checks):
    if not isinstance(model, CovarianceModule):
        raise TypeError(f"model must be a CovarianceModule, got {type(model).__name__}")
    device = model._device()
    y = as_data(y, "y", 1, device)
    n = y.shape[0]
    if model.shape != (n, n):
        raise ValueError(f"the covariance model has shape {model.shape} but y has length {n}")
    if X is None:
        X = torch.ones(n, 1, dtype=torch.float64, device=device)
    X = as_data(X, "X", 2, device)
    if X.shape[0] != n:
        raise ValueError(f"X must have shape (n, p) with n = len(y) = {n} rows, "
                         f"got {tuple(X.shape)}")
    if checks.singular_v:
        check_distinct_rows(identical_rows(model))
    return model, y, X


def _device(parts) -> torch.device:
    """The first model's device, for the reductions (the CPU when it is not a model)."""
    model = parts[0][0] if isinstance(parts[0], (tuple, list)) and parts[0] else None
    return model._device() if isinstance(model, CovarianceModule) else torch.device("cpu")


def _agree(total, error, p: int, pieces: int, device) -> None:
    """Raise on every process when one refused its data or the processes' shards differ."""
    status = total(torch.tensor([error is not None, 1.0, p, p * p, pieces, pieces * pieces],
                                dtype=torch.float64, device=device))
    failed, count, p_sum, p_squares, pieces_sum, pieces_squares = status.tolist()
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"the data of {int(failed)} other process(es) were refused (see "
                         "their error)")
    if p_sum ** 2 != p_squares * count or pieces_sum ** 2 != pieces_squares * count:
        raise ValueError("the processes' shards differ in the columns of X or in the random "
                         "terms of the model")


def _names(x_names, intercept: bool, p: int) -> list[str]:
    if x_names is None:
        return ["(Intercept)"] if intercept else [f"x{j}" for j in range(p)]
    names = list(x_names)
    if len(names) != p:
        raise ValueError(f"x_names has {len(names)} names for {p} columns of X")
    return names


def _data_sums(y, X, levels: list[int]) -> torch.Tensor:
    """``XᵀX``, ``Xᵀy``, ``1ᵀX``, ``yᵀy``, ``n`` and the grouping levels of one part."""
    counts = torch.tensor([y.shape[0]] + levels, dtype=y.dtype, device=y.device)
    return torch.cat([(X.T @ X).reshape(-1), X.T @ y, X.sum(0), (y @ y)[None], counts])


def _residual_sums(y, X, beta) -> torch.Tensor:
    """``Xᵀr``, ``rᵀr``, ``1ᵀr`` of ``r = y - X b`` and ``Σ (|y| + |X||b|)²`` (its rounding
    scale)."""
    r = y - X @ beta
    scale = y.abs() + X.abs() @ beta.abs()
    return torch.cat([X.T @ r, torch.stack([r @ r, r.sum(), scale @ scale])])


# ------------------------------------------------------------------ design checks
class _Grouping(NamedTuple):
    label: str      # "random term 'g'" or "the Grouped structure 'residual'"
    kind: str       # "term" or "grouped"
    k: int          # random effects per level
    levels: int     # levels (groups) with rows


def _groupings(model) -> list[_Grouping]:
    """The random terms and ``Grouped`` pieces of ``V`` with their levels in this data."""
    paths = {id(m): path.replace(".", "/") for path, m in model.named_modules()}
    out = []
    for name, module, _ in additive_pieces(model):
        if name is not None:
            out.append(_Grouping(f"random term {name!r}", "term", *_term_levels(model, name,
                                                                                 module)))
        elif isinstance(module, Grouped):
            out.append(_Grouping(f"the Grouped structure {paths[id(module)] or 'V'!r}",
                                 "grouped", 1, module.num_groups))
    return out


def _shared_levels(total, local, device) -> list[int]:
    """The levels with rows of each grouping over shards that share their level codes."""
    presence = [sum(parts) for parts in zip(*[_presence(model) for model, _, _ in local])]
    sizes = [float(v.numel()) for v in presence]
    agree = total(torch.tensor([1.0, sum(sizes), sum(sizes) ** 2], dtype=torch.float64,
                               device=device))
    if float(agree[1]) ** 2 != float(agree[2]) * float(agree[0]):
        raise ValueError("the processes' models differ in the levels of their groupings")
    if not presence:
        return []
    flags = total(torch.cat(presence).to(torch.float64))
    return [int((part > 0).sum()) for part in flags.split([int(v) for v in sizes])]


def _presence(model) -> list[torch.Tensor]:
    """Per grouping of :func:`_groupings`, whether each level (column) has a row here."""
    out = []
    for name, module, _ in additive_pieces(model):
        if name is not None:
            out.append(_term_presence(model, name, module)[1].double())
        elif isinstance(module, Grouped):
            out.append((torch.bincount(module.group_codes, minlength=module.num_groups)
                        > 0).double())
    return out


def _term_presence(model: MixedModel, name: str, G) -> tuple[int, torch.Tensor]:
    """Random effects per level of term ``name`` and whether each level has a row."""
    terms, block = model.terms.get(name), G.repeated_block_view()
    k = len(terms) if terms else (block.block.shape[0] if block is not None else 1)
    rows = model.term_groups(name, k)
    if rows is None:                     # no block pattern: each column is a level
        return 1, (model.design(name) != 0).any(0)
    level = rows[0][rows[0] >= 0]
    return k, torch.bincount(level, minlength=model.designs[name].shape[1] // k) > 0


def _term_levels(model: MixedModel, name: str, G) -> tuple[int, int]:
    """Random effects per level and the number of levels with rows of term ``name``."""
    k, present = _term_presence(model, name, G)
    return k, int(present.sum())


def _check_groupings(groupings: list[_Grouping], n: int, checks: Checks) -> None:
    for g in groupings:
        failed = []
        if g.kind == "term":
            if checks.levels_gt_1 and g.levels < 2:
                failed.append(("levels_gt_1", f"has {g.levels} level(s): its variance needs a "
                               "grouping factor with at least 2 levels (lme4: check.nlev.gtr.1)"))
            if checks.obs_gt_levels and g.levels >= n:
                failed.append(("obs_gt_levels", f"has {g.levels} levels for {n} observations "
                               "(one row per level), so its variance is confounded with the "
                               "residual's (lme4: check.nobs.vs.nlev)"))
            if checks.obs_gt_effects and n <= g.levels * g.k:
                failed.append(("obs_gt_effects", f"has {g.levels * g.k} random effects "
                               f"({g.levels} levels x {g.k}) for {n} observations, so its "
                               "covariance and the residual variance are not identified "
                               "(lme4: check.nobs.vs.nRE)"))
        elif checks.obs_gt_levels and g.levels >= n:
            failed.append(("obs_gt_levels", f"has one row per group ({g.levels} groups for "
                           f"{n} rows): only the diagonal of its structure enters V, so its "
                           "correlations are not identified"))
        if failed:
            options = ", ".join(f"{option}=False" for option, _ in failed)
            raise ValueError(f"{g.label} " + "; it ".join(reason for _, reason in failed)
                             + f". Pass checks=Checks({options}) to fit anyway")
