"""The DataModule: a CSV or parquet table and a model spec, served as batches of whole groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset

from covmodules.specs import ModelSpec, Problem, SpecError

__all__ = ["Batch", "MixedModelDataModule", "read_table", "loader"]


def read_table(path: Union[str, Path], key: str = "data.path") -> pd.DataFrame:
    """Read a CSV (``.csv``, ``.tsv``, ``.txt``) or parquet (``.parquet``, ``.pq``) file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{key}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            return pd.read_parquet(path)
        except ImportError as err:
            raise SpecError(f"{key}: reading parquet needs pyarrow or fastparquet "
                            f"({err})") from None
    if suffix not in (".csv", ".tsv", ".txt"):
        raise SpecError(f"{key}: unsupported file type {suffix!r}; use .csv, .tsv or .parquet")
    return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")


class Batch:
    """Whole groups of rows: their :class:`~covmodules.specs.Problem` and the split they
    belong to (``"train"`` or ``"val"``). ``to(device)`` moves the model, ``y`` and ``X``."""

    def __init__(self, problem: Problem, split: str):
        self.problem, self.split = problem, split

    def to(self, device, **kwargs) -> "Batch":
        p = self.problem
        p.model.to(device)
        p.y, p.X = p.y.to(device), p.X.to(device)
        return self

    def __len__(self) -> int:
        return len(self.problem.frame)

    def __repr__(self) -> str:
        return f"Batch(split={self.split!r}, rows={len(self)})"


class _Batches(Dataset):
    def __init__(self, batches: list[Batch]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.batches[i]


def _first(items: list[Batch]) -> Batch:
    return items[0]


def loader(batches: list[Batch], shuffle: bool = False) -> DataLoader:
    """One :class:`Batch` per step (a batch sampler of size 1, so Lightning knows the indices)."""
    return DataLoader(_Batches(batches), batch_size=1, shuffle=shuffle, collate_fn=_first)


class MixedModelDataModule(L.LightningDataModule):
    """A table and a model spec (see :mod:`covmodules.specs`) as batches of whole groups.

    The training set is one batch by default (REML needs all of it); ``groups_per_batch``
    splits it into batches of that many whole groups (for Adam/SGD: each step then uses the
    REML of one batch). ``val_fraction`` holds out that fraction of the groups (``group``,
    by default the grouping that makes ``V`` block diagonal) for prediction metrics.

    Args:
        path: CSV or parquet file.
        response, fixed, intercept, levels, factors, random, residual, fix: the model spec.
        query: a pandas ``DataFrame.query`` string selecting the rows to use.
        group: grouping column(s) of the independent blocks (batches and validation split).
        val_fraction: fraction of the groups held out for validation.
        groups_per_batch: groups per training batch (``None``: all in one batch); validation
            batches use it too.
        split_seed: seed of the random validation split.
    """

    def __init__(self, path: str, response: str, fixed: Optional[list[str]] = None,
                 intercept: bool = True, levels: Optional[dict[str, list]] = None,
                 factors: Optional[list[str]] = None, random: Optional[dict[str, Any]] = None,
                 residual: Union[str, dict[str, Any]] = "scalar",
                 fix: Optional[dict[str, float]] = None, query: Optional[str] = None,
                 group: Union[str, list[str], None] = None, val_fraction: float = 0.0,
                 groups_per_batch: Optional[int] = None, split_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.spec = ModelSpec.from_dict(
            {"response": response, "fixed": fixed or [], "intercept": intercept,
             "levels": levels, "factors": factors or [], "random": random,
             "residual": residual, "fix": fix}, prefix="data.")
        if not 0.0 <= val_fraction < 1.0:
            raise SpecError(f"data.val_fraction: must lie in [0, 1), got {val_fraction}")
        if groups_per_batch is not None and groups_per_batch < 1:
            raise SpecError(f"data.groups_per_batch: must be >= 1, got {groups_per_batch}")
        self.path, self.query, self.group = path, query, group
        self.val_fraction, self.groups_per_batch, self.split_seed = (val_fraction,
                                                                     groups_per_batch, split_seed)
        self.frame: Optional[pd.DataFrame] = None
        self.train_problem: Optional[Problem] = None
        self.train_batches: list[Batch] = []
        self.val_batches: list[Batch] = []

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the table, build the design and the problems of the training batches and the
        validation groups (once)."""
        if self.frame is None:
            self._build()
        if not self.val_batches and self.trainer is not None:
            self.trainer.limit_val_batches = 0    # nothing held out: no validation loop

    def _build(self) -> None:
        df = read_table(self.path)
        if self.query:
            try:
                df = df.query(self.query)
            except Exception as err:
                raise SpecError(f"data.query: cannot apply {self.query!r}: {err}") from None
        frame = self.spec.prepare(df)
        design = self.spec.design(frame)
        codes, labels = self.spec.groups(frame, self.group)
        codes = codes.numpy()
        num_groups = len(labels)
        num_val = int(round(self.val_fraction * num_groups))
        if self.val_fraction > 0 and not 0 < num_val < num_groups:
            raise SpecError(f"data.val_fraction: {self.val_fraction} of {num_groups} "
                            f"independent group(s) leaves no validation or no training group")
        order = np.random.default_rng(self.split_seed).permutation(num_groups)
        val_groups, train_groups = np.sort(order[:num_val]), np.sort(order[num_val:])
        self.frame = frame
        self.train_problem = self.spec.problem(frame, np.flatnonzero(np.isin(codes, train_groups)),
                                               design)
        chunks = self._batches(frame, design, codes, train_groups, "train")
        self.train_batches = (chunks if self.groups_per_batch and len(chunks) > 1
                              else [Batch(self.train_problem, "train")])
        self.val_batches = self._batches(frame, design, codes, val_groups, "val")

    def _batches(self, frame, design, codes, groups, split) -> list[Batch]:
        size = self.groups_per_batch or max(len(groups), 1)
        chunks = [groups[i:i + size] for i in range(0, len(groups), size)]
        return [Batch(self.spec.problem(frame, np.flatnonzero(np.isin(codes, chunk)), design),
                      split) for chunk in chunks]

    def train_dataloader(self) -> DataLoader:
        return loader(self.train_batches, shuffle=len(self.train_batches) > 1)

    def val_dataloader(self) -> DataLoader:
        return loader(self.val_batches)

    def predict_dataloader(self) -> DataLoader:
        return loader([Batch(self.train_problem, "train"), *self.val_batches])

    @property
    def num_rows(self) -> int:
        return 0 if self.frame is None else len(self.frame)

    def describe(self) -> str:
        """One line: rows, training/validation rows and batches."""
        val_rows = sum(len(b) for b in self.val_batches)
        return (f"{self.path}: {self.num_rows} rows; training {len(self.train_problem.frame)} rows "
                f"in {len(self.train_batches)} batch(es); validation {val_rows} rows in "
                f"{len(self.val_batches)} batch(es)")

