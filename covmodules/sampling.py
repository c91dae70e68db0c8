"""Batches of whole groups for training covariance layers (torch only, no Lightning).

A grouped layer's loss is a sum over groups only when each batch holds whole groups, so its
training data is served by group rather than by row: :class:`GroupBatchSampler` with any
``DataLoader``. (The Lightning data code in ``training/`` builds on torch's samplers too; this
module is the one a plain torch loop or a user without Lightning imports.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .validation import check_size

__all__ = ["GroupBatchSampler"]


class GroupBatchSampler(torch.utils.data.Sampler):
    """Batches of whole groups: each item is a tensor of the row indices of ``groups_per_batch``
    groups (the last batch may hold fewer).

    Use with ``DataLoader(TensorDataset(...), sampler=GroupBatchSampler(...), batch_size=None)``:
    each batch is then one fancy-indexing of the tensors. Shuffled per epoch from ``seed`` and
    the epoch (``set_epoch``, as Lightning calls it; otherwise counted per iteration).

    Example::

        >>> from covmodules import GroupBatchSampler
        >>> sampler = GroupBatchSampler([0, 1, 0, 2, 1], groups_per_batch=2, shuffle=False)
        >>> [b.tolist() for b in sampler]
        [[0, 2, 1, 4], [3]]
    """

    def __init__(self, groups, groups_per_batch: int, shuffle: bool = True, seed: int = 0):
        codes = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups)
        if codes.ndim != 1 or codes.dtype.kind not in "iu":
            raise TypeError("groups must be a 1-D sequence of integer codes")
        if len(codes) and codes.min() < 0:
            raise ValueError("groups must be non-negative codes")
        self.groups_per_batch = check_size(groups_per_batch, "groups_per_batch")
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes)
        self._rows = [torch.from_numpy(rows)
                      for rows in np.split(order, np.cumsum(sizes)[:-1]) if len(rows)]

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration's shuffle from ``seed + epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self._rows) / self.groups_per_batch)

    def __iter__(self):
        G = len(self._rows)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(G, generator=generator)
        else:
            perm = torch.arange(G)
        self.epoch += 1
        for start in range(0, G, self.groups_per_batch):
            yield torch.cat([self._rows[j] for j in perm[start:start + self.groups_per_batch]])
