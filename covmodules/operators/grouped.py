r"""One covariance structure shared by every level of a grouping factor.

Row ``i`` of the data belongs to group ``g_i`` and sits at position ``p_i`` (an index into
the ``T x T`` structure ``S``, e.g. a time point):

.. math:: V_{ij} = S_{p_i p_j} [g_i = g_j],

block diagonal after sorting the rows by group. With ``P`` the ``N x T`` one-hot matrix of
positions and ``Same_ij = [g_i = g_j]``, ``V = (P S Pᵀ) ∘ Same``; the cotangent of ``S`` is
``Pᵀ (Ḡ ∘ Same) P`` (a scatter-add over same-group pairs), and ``dV W`` scatters ``W`` into
``H[g, p, :]``, applies ``dS`` along ``p`` for every group at once and gathers the rows back
at ``(p_i, g_i)`` — nothing of size ``K x N x N`` is formed.
"""

import numpy as np
import pandas as pd
import torch

from .base import Operator


def group_codes(groups) -> np.ndarray:
    """Integer codes ``0..G-1`` of 1-D group labels (codes follow the sorted labels)."""
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    if not isinstance(groups, (pd.Series, pd.Index, pd.Categorical)):
        groups = np.asarray(groups)
    if np.ndim(groups) != 1:
        raise ValueError(f"groups must be 1-D, got shape {np.shape(groups)}")
    if len(groups) == 0:
        raise ValueError("groups must label at least one row")
    try:
        codes, _ = pd.factorize(groups, sort=True)
    except TypeError as err:
        raise TypeError(f"groups labels cannot be sorted: {err}") from None
    if (codes < 0).any():
        raise ValueError("groups contains missing values")
    return codes.astype(np.int64)


def default_positions(codes: np.ndarray) -> np.ndarray:
    """Row order within each group: ``0, 1, 2, ...`` in data-row order."""
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    first = np.searchsorted(sorted_codes, sorted_codes, side="left")
    out = np.empty_like(codes)
    out[order] = np.arange(len(codes)) - first
    return out


def check_positions(positions, n: int) -> np.ndarray:
    """Integer positions, one per row."""
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    arr = np.asarray(positions)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"positions must be 1-D with one entry per row ({n}), "
                         f"got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise ValueError("positions must be whole numbers")
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"positions must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


class Grouped(Operator):
    r"""``S`` within each group, zero between groups: :math:`V_{ij} = S_{p_i p_j} [g_i = g_j]`.

    ``Grouped(structure, groups, positions=None)``: ``structure`` is one ``T x T`` covariance
    module (name it by keyword, ``time=AR1Matrix(T)``, to prefix its parameter names; its
    parameters are shared by all groups). ``groups`` labels each of the ``N`` rows (ints,
    strings, tensor, numpy or pandas); ``positions`` gives each row's index ``0..T-1`` into
    ``S`` (default: the row's order within its group, as nlme's ``corAR1(form = ~1 | g)``).
    Rows may come in any order, groups may differ in size and skip positions, so
    ``Grouped(AR1Matrix(T), groups=subject, positions=time)`` is ASReml's
    ``id(subject).ar1(time)``. Group codes and positions are kept as (non-persistent)
    buffers ``group_codes`` and ``positions``.

    Example::

        >>> import torch
        >>> from covmodules import AR1Matrix, Grouped
        >>> V = Grouped(time=AR1Matrix(3), groups=["b", "a", "b", "a", "a"],
        ...             positions=[0, 2, 2, 0, 1])
        >>> V(torch.tensor([0.0, 1.0]))       # rho = tanh(1/2) = 0.4621
        tensor([[1.0000, 0.0000, 0.2136, 0.0000, 0.0000],
                [0.0000, 1.0000, 0.0000, 0.2136, 0.4621],
                [0.2136, 0.0000, 1.0000, 0.0000, 0.0000],
                [0.0000, 0.2136, 0.0000, 1.0000, 0.4621],
                [0.0000, 0.4621, 0.0000, 0.4621, 1.0000]])
        >>> V.free_param_names, V.num_groups
        (['time/sigma^2', 'time/rho'], 2)
    """

    min_operands = max_operands = 1

    def __init__(self, *args, groups=None, positions=None, **kwargs):
        if len(args) > 1 and groups is None:
            if len(args) > 3 or (len(args) == 3 and positions is not None):
                raise TypeError("Grouped takes (structure, groups, positions=None)")
            args, groups, positions = args[:1], args[1], args[2] if len(args) == 3 else positions
        if groups is None:
            raise TypeError("Grouped needs groups: one label per row")
        super().__init__(*args, **kwargs)
        T = self.operand_modules[0].shape[0]
        codes = group_codes(groups)
        if positions is None:
            pos = default_positions(codes)
            if pos.max() >= T:
                raise ValueError(f"a group has {pos.max() + 1} rows but the structure is "
                                 f"{T} x {T}; pass positions or a larger structure")
        else:
            pos = check_positions(positions, len(codes))
            bad = (pos < 0) | (pos >= T)
            if bad.any():
                raise ValueError(f"positions must lie in 0..{T - 1} (the structure is {T} x {T}), "
                                 f"got {pos[bad][0]} at row {int(np.flatnonzero(bad)[0])}")
        self.num_groups = int(codes.max()) + 1
        self.register_buffer("group_codes", torch.from_numpy(codes), persistent=False)
        self.register_buffer("positions", torch.from_numpy(pos), persistent=False)

    def _check_shapes(self, shapes):
        (t1, t2), = shapes
        if t1 != t2:
            raise ValueError(f"Grouped needs a square structure, got {t1} x {t2}")

    @property
    def shape(self):
        n = self.group_codes.numel()
        return (n, n)

    def _other_group(self):
        g = self.group_codes
        return g[:, None] != g[None, :]

    def _evaluate(self, nat):
        S = self.operand_modules[0]._evaluate(nat)
        V = S.index_select(0, self.positions).index_select(1, self.positions)
        return V.masked_fill_(self._other_group(), 0)

    def _vjp(self, nat, G):
        s = self.operand_modules[0]
        if not s.num_params:
            return nat.new_zeros(0)
        T, p = s.shape[0], self.positions
        same = G.masked_fill(self._other_group(), 0)
        rows = G.new_zeros(T, G.shape[1]).index_add_(0, p, same)
        return s._vjp(nat, G.new_zeros(T, T).index_add_(1, p, rows))

    def _dv_matmul(self, nat, W, transpose=False):
        s = self.operand_modules[0]
        T, r, p, g = s.shape[0], W.shape[1], self.positions, self.group_codes
        H = W.new_zeros(self.num_groups, T, r).index_put_((g, p), W, accumulate=True)
        H = H.permute(1, 0, 2).reshape(T, self.num_groups * r)
        out = s._dv_matmul(nat, H, transpose).reshape(-1, T, self.num_groups, r)
        return out[:, p, g, :]

    def extra_repr(self):
        return f"rows={self.shape[0]}, groups={self.num_groups}"
