r"""One covariance structure shared by every level of a grouping factor.

Row ``i`` of the data belongs to group ``g_i`` and sits at position ``p_i`` (an index into
the ``T x T`` structure ``S``, e.g. a time point):

.. math:: V_{ij} = S_{p_i p_j} [g_i = g_j],

block diagonal after sorting the rows by group. With ``P`` the ``N x T`` one-hot matrix of
positions and ``Same_ij = [g_i = g_j]``, ``V = (P S Pᵀ) ∘ Same`` and the cotangent of ``S`` is
``Pᵀ (Ḡ ∘ Same) P``. Both touch only the within-group pairs: groups are padded into blocks
``(groups, m)`` of row indices (one block per size class ``2^(k-1) < size <= 2^k``, so padding
at most quadruples the ``sum_g size_g²`` pairs), ``V`` is scattered from ``S[p_a, p_b]`` and
``Ḡ`` gathered from its diagonal blocks and scatter-added at ``(p_a, p_b)``. ``dV W``
scatters ``W`` into ``H[g, p, :]``, applies ``dS`` along ``p`` for every group at once and
gathers the rows back at ``(p_i, g_i)``. Nothing of size ``K x N x N`` (nor an ``N x N``
mask) is formed.
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


def size_class_blocks(codes: np.ndarray, positions: np.ndarray):
    """Per size class: ``(rows, positions, valid)``, each ``(groups in class, max size)``.

    Groups with ``2^(k-1) < size <= 2^k`` share class ``k``; rows are listed in data order
    within each group and padded with row 0 at position 0 (``valid`` False).
    """
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    slot = np.arange(len(codes)) - (np.cumsum(sizes) - sizes)[codes[order]]
    size_class = np.ceil(np.log2(sizes)).astype(np.int64)
    blocks = []
    for k in np.unique(size_class):
        members = np.flatnonzero(size_class == k)
        index = np.full(len(sizes), -1)
        index[members] = np.arange(len(members))
        take = index[codes[order]] >= 0
        m = int(sizes[members].max())
        rows = np.zeros((len(members), m), dtype=np.int64)
        rows[index[codes[order][take]], slot[take]] = order[take]
        valid = np.zeros((len(members), m), dtype=bool)
        valid[index[codes[order][take]], slot[take]] = True
        blocks.append((rows, np.where(valid, positions[rows], 0), valid))
    return blocks


def grouped_dv_matmul(structure, nat, codes, positions, W, transpose=False, num_groups=None):
    """``[dV/dθ_k @ W]_k`` of ``V_ij = S_{p_i p_j} [g_i = g_j]`` (``S`` = ``structure`` at
    ``nat``; ``codes`` ``0..G-1``, ``G = num_groups`` or their maximum + 1): ``W`` scattered
    into ``H[g, p, :]``, ``dS`` applied along ``p`` for every group at once, the rows gathered
    back at ``(p_i, g_i)``."""
    T, r = structure.shape[0], W.shape[1]
    G = int(codes.max()) + 1 if num_groups is None else num_groups
    H = W.new_zeros(G, T, r).index_put_((codes, positions), W, accumulate=True)
    H = H.permute(1, 0, 2).reshape(T, G * r)
    out = structure._dv_matmul(nat, H, transpose).reshape(-1, T, G, r)
    return out[:, positions, codes, :]


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
        self._size_classes = None      # (device, blocks): formed when first evaluated

    def _check_shapes(self, shapes):
        (t1, t2), = shapes
        if t1 != t2:
            raise ValueError(f"Grouped needs a square structure, got {t1} x {t2}")

    @property
    def shape(self):
        n = self.group_codes.numel()
        return (n, n)

    def _blocks(self):
        """``(rows, positions, pair mask or None)`` per size class, on the buffers' device
        (formed on first use: the structured solvers never need them)."""
        device = self.group_codes.device
        if self._size_classes is None or self._size_classes[0] != device:
            blocks = []
            for rows, pos, valid in size_class_blocks(self.group_codes.cpu().numpy(),
                                                      self.positions.cpu().numpy()):
                rows, pos, valid = (torch.from_numpy(a).to(device) for a in (rows, pos, valid))
                blocks.append((rows, pos, None if bool(valid.all()) else
                               valid[:, :, None] & valid[:, None, :]))
            self._size_classes = (device, blocks)
        yield from self._size_classes[1]

    def _evaluate(self, nat):
        S = self.operand_modules[0]._evaluate(nat)
        n = self.shape[0]
        V = S.new_zeros(n, n)
        for rows, pos, pairs in self._blocks():
            B = S[pos[:, :, None], pos[:, None, :]]
            if pairs is not None:
                B = B.masked_fill(~pairs, 0)
            V.index_put_((rows[:, :, None], rows[:, None, :]), B, accumulate=pairs is not None)
        return V

    def _vjp(self, nat, G):
        s = self.operand_modules[0]
        if not s.num_params:
            return nat.new_zeros(0)
        T = s.shape[0]
        G_S = G.new_zeros(T * T)
        for rows, pos, pairs in self._blocks():
            B = G[rows[:, :, None], rows[:, None, :]]
            if pairs is not None:
                B.masked_fill_(~pairs, 0)
            G_S.index_add_(0, (pos[:, :, None] * T + pos[:, None, :]).reshape(-1), B.reshape(-1))
        return s._vjp(nat, G_S.reshape(T, T))

    def _dv_matmul(self, nat, W, transpose=False):
        return grouped_dv_matmul(self.operand_modules[0], nat, self.group_codes, self.positions,
                                 W, transpose, self.num_groups)

    def extra_repr(self):
        return f"rows={self.shape[0]}, groups={self.num_groups}"
