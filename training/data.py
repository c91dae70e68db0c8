"""The DataModule: a CSV or parquet table and a model spec, served as batches of whole groups.

Under DDP each process keeps the whole groups :class:`GroupSampler` gives it, split into
batches of ``groups_per_batch`` groups; :class:`~training.module.REMLModule` sums their REML
statistics over batches and processes (:class:`~covmodules.distributed.ShardedREML`).
Crossed random terms, whose rows form one block, are split by rows instead, each process
summing its rows' sufficient statistics (:class:`~covmodules.crossed.CrossedREML`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from covmodules.prediction import Fitted
from covmodules.specs import ModelSpec, Problem, SpecError

__all__ = ["Batch", "Rows", "GroupSampler", "MixedModelDataModule", "read_table", "loader",
           "split_of"]


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


def _check_complete(frame: pd.DataFrame, column: str, key: str) -> None:
    """A grouping or index ``column`` has no missing (or, when numeric, infinite) values."""
    if column not in frame.columns:
        return                                  # the spec names the key of a missing column
    values = frame[column]
    bad, what = values.isna().to_numpy().copy(), "missing"
    if pd.api.types.is_numeric_dtype(values):
        bad |= ~np.isfinite(values.to_numpy(dtype=np.float64))
        what = "missing or infinite"
    if bad.any():
        rows = frame.index[bad]
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise SpecError(f"{key}: column {column!r} has {len(rows)} {what} value(s) (data "
                        f"rows {shown}); fill them in or drop those rows")


class Batch:
    """Whole groups of rows (or a process's share of the rows of crossed terms): their
    :class:`~covmodules.specs.Problem` and the split they belong to (``"train"`` or
    ``"val"``). ``to(device)`` moves the model, ``y`` and ``X``."""

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


class Rows:
    """Rows of a table to predict (no response needed), as read and coded by the spec."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame

    def to(self, device, **kwargs) -> "Rows":
        return self

    def __len__(self) -> int:
        return len(self.frame)


class _Batches(Dataset):
    def __init__(self, batches: list[Batch]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.batches[i]


def _first(items: list[Batch]) -> Batch:
    return items[0]


class GroupSampler(Sampler[int]):
    """The groups of process ``rank`` of ``num_replicas``: ``range(num_groups)`` in contiguous
    runs, ``⌊r G / R⌋ .. ⌊(r + 1) G / R⌋ - 1`` for process ``r``, whose lengths differ by at
    most one. Deterministic and never padded (a ``DistributedSampler`` repeats items to even
    out the counts), so every group enters the REML sums exactly once."""

    def __init__(self, num_groups: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in 0..{num_replicas - 1}, got {rank}")
        self.start = rank * num_groups // num_replicas
        self.stop = (rank + 1) * num_groups // num_replicas

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class _Local(DistributedSampler):
    """Every item, in order: the batches already belong to this process, and Lightning keeps
    a ``DistributedSampler`` instead of splitting (and padding) them over the processes again."""

    def __init__(self, dataset: Dataset):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)


def loader(items: list) -> DataLoader:
    """One item per step (a batch sampler of size 1, so Lightning knows the indices), on this
    process only."""
    dataset = _Batches(items)
    return DataLoader(dataset, batch_size=1, sampler=_Local(dataset), collate_fn=_first)


class MixedModelDataModule(L.LightningDataModule):
    """A table and a model spec (see :mod:`covmodules.specs`) as batches of whole groups.

    The training set is one batch by default; ``groups_per_batch`` splits it into batches of
    that many whole groups (every step still uses all of them: the REML statistics are summed
    over batches, exactly). Under DDP (``Trainer(strategy="ddp", devices=N)``) each process
    keeps only its share of the groups (:class:`GroupSampler`), in batches the same way.
    ``val_fraction`` holds out that fraction of the groups (``group``, by default the grouping
    that makes ``V`` block diagonal) for prediction metrics; they are split over the processes
    too.

    ``predict`` reads the rows of ``path`` (in file order, after ``query``; the response is
    not needed) and predicts them from the fitted ``b̂`` and BLUPs the model holds.

    Args:
        path: CSV or parquet file.
        response, fixed, intercept, levels, factors, random, residual, fix: the model spec.
        formula, correlation: the model as an R formula (instead of ``response`` and
            ``fixed``; see :mod:`covmodules.formula`); ``random`` then changes only the keys
            it names of the formula's terms.
        query: a pandas ``DataFrame.query`` string selecting the rows to use.
        group: grouping column(s) of the independent blocks (batches and validation split).
        val_fraction: fraction of the groups held out for validation.
        groups_per_batch: groups per training batch (``None``: all in one batch); validation
            batches use it too.
        split_seed: seed of the random validation split.
    """

    def __init__(self, path: str, response: Optional[str] = None,
                 fixed: Optional[list[str]] = None,
                 intercept: bool = True, levels: Optional[dict[str, list]] = None,
                 factors: Optional[list[str]] = None, random: Optional[dict[str, Any]] = None,
                 residual: Union[str, dict[str, Any], None] = None,
                 fix: Optional[dict[str, float]] = None, query: Optional[str] = None,
                 group: Union[str, list[str], None] = None, val_fraction: float = 0.0,
                 groups_per_batch: Optional[int] = None, split_seed: int = 0,
                 formula: Optional[str] = None, correlation: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters(logger=False)
        config = {"formula": formula, "correlation": correlation, "response": response,
                  "fixed": fixed or [], "intercept": intercept, "levels": levels,
                  "factors": factors or [], "random": random, "residual": residual, "fix": fix}
        self.spec = ModelSpec.from_dict({k: v for k, v in config.items() if v is not None},
                                        prefix="data.")
        if not 0.0 <= val_fraction < 1.0:
            raise SpecError(f"data.val_fraction: must lie in [0, 1), got {val_fraction}")
        if groups_per_batch is not None and groups_per_batch < 1:
            raise SpecError(f"data.groups_per_batch: must be >= 1, got {groups_per_batch}")
        if split_seed < 0:
            raise SpecError(f"data.split_seed: must be >= 0, got {split_seed}")
        self.path, self.query, self.group = path, query, group
        self.val_fraction, self.groups_per_batch, self.split_seed = (val_fraction,
                                                                     groups_per_batch, split_seed)
        self.frame: Optional[pd.DataFrame] = None
        self.train_batches: list[Batch] = []
        self.val_batches: list[Batch] = []
        self._process: Optional[tuple[int, int]] = None
        self._train_problem: Optional[Problem] = None
        self.split_labels: dict[str, list[str]] = {}
        self.predict_rows: Optional[Rows] = None

    @property
    def process(self) -> tuple[int, int]:
        """``(rank, world size)`` of this process under the trainer (``(0, 1)`` without one)."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the table, build the design and the problems of this process's training
        batches and validation groups (once per process layout); for ``predict``, the rows."""
        if stage == "predict":
            self.predict_rows = Rows(self.spec.coded(self._read()))
            if self.frame is not None or self.spec.response not in self.predict_rows.frame:
                return                # the model comes from the fit or its checkpoint
        if self.frame is None or self._process != self.process:
            self._build(*self.process)
        if not self.val_batches and self.trainer is not None:
            self.trainer.limit_val_batches = 0    # nothing held out: no validation loop

    @property
    def train_problem(self) -> Optional[Problem]:
        """All training groups as one :class:`Problem` (built on first use when they are split
        over batches or processes)."""
        if self.frame is None:
            return None
        if self._train_problem is None:
            if len(self.train_batches) == 1 and self._process[1] == 1:
                self._train_problem = self.train_batches[0].problem
            else:
                self._train_problem = self.spec.problem(self.frame, self._train_rows,
                                                        self._design, self._axis)
        return self._train_problem

    def fitted_batches(self, state: dict) -> list[Batch]:
        """The training batches of the data a fit was run on (its checkpoint's ``fitted``
        state, :func:`training.prediction.fitted_state`), to rebuild its model for predict."""
        self._build(*self.process, Fitted.from_state_dict(self.spec, state).frame)
        return self.train_batches

    def _read(self) -> pd.DataFrame:
        df = read_table(self.path)
        if self.query:
            try:
                df = df.query(self.query)
            except Exception as err:
                raise SpecError(f"data.query: cannot apply {self.query!r}: {err}") from None
        return df

    def _build(self, rank: int, world: int, df: Optional[pd.DataFrame] = None) -> None:
        frame = self.spec.prepare(self._read() if df is None else df)
        for key, column in self._index_columns():
            _check_complete(frame, column, key)
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
        self.split_labels = {"train": [labels[g] for g in train_groups],
                             "val": [labels[g] for g in val_groups]}
        self.frame, self._process, self._train_problem = frame, (rank, world), None
        self._design, self._axis = design, self.spec.time_axis(frame)
        self._train_rows = np.flatnonzero(np.isin(codes, train_groups))
        if world > 1 and num_groups == 1 and self.group is None and self.spec.random \
                and self.spec.residual.structure in ("scalar", "identity"):
            # crossed terms, one block of rows: each process sums a share of its rows
            rows = np.array_split(self._train_rows, world)[rank]
            self.train_batches = [Batch(self.spec.problem(frame, rows, design, self._axis,
                                                          shared_levels=True), "train")]
            self.val_batches = []
            return
        for name, groups in (("training", train_groups), ("validation", val_groups)):
            if 0 < len(groups) < world:
                raise SpecError(f"data.group: {len(groups)} {name} group(s) for {world} "
                                "processes; every process needs at least one (use fewer devices "
                                "or a finer data.group)")
        self.train_batches = self._batches(codes, self._share(train_groups, rank, world), "train")
        self.val_batches = self._batches(codes, self._share(val_groups, rank, world), "val")

    def _index_columns(self) -> list[tuple[str, str]]:
        """``(key, column)`` of every column that groups or orders the rows: the random terms'
        groupings, the residual's index columns and ``group``."""
        spec, pairs = self.spec, []
        for name, term in spec.random.items():
            pairs += [(f"data.random.{name}.group", col) for col in term.group]
        for key, value in spec.residual.index.items():
            pairs += [(f"data.residual.{key}", col)
                      for col in ([value] if isinstance(value, str) else value)]
        if self.group is not None:
            pairs += [("data.group", col)
                      for col in ([self.group] if isinstance(self.group, str) else self.group)]
        return pairs

    @staticmethod
    def _share(groups: np.ndarray, rank: int, world: int) -> np.ndarray:
        return groups[list(GroupSampler(len(groups), world, rank))]

    def _batches(self, codes, groups, split) -> list[Batch]:
        size = self.groups_per_batch or max(len(groups), 1)
        chunks = [groups[i:i + size] for i in range(0, len(groups), size)]
        return [Batch(self.spec.problem(self.frame, np.flatnonzero(np.isin(codes, chunk)),
                                        self._design, self._axis), split) for chunk in chunks]

    def train_dataloader(self) -> DataLoader:
        """One item per step: all of this process's training batches."""
        return loader([self.train_batches])

    def val_dataloader(self) -> DataLoader:
        return loader(self.val_batches)

    def predict_dataloader(self) -> DataLoader:
        """The rows of ``path`` (read at ``setup("predict")``), one item."""
        if self.predict_rows is None:
            self.setup("predict")
        return loader([self.predict_rows])


def split_of(spec: ModelSpec, frame: pd.DataFrame, group, labels: dict) -> np.ndarray:
    """``"train"``, ``"val"`` or ``"new"`` per row of ``frame``: whether its group (see
    :meth:`~covmodules.specs.ModelSpec.groups`) is among the ``labels`` of the fit's training
    or validation groups, or neither."""
    try:
        codes, names = spec.groups(frame, group)
    except SpecError:
        return np.full(len(frame), "new", dtype=object)
    split = {label: name for name in ("train", "val") for label in labels.get(name, [])}
    names = np.asarray([split.get(label, "new") for label in names], dtype=object)
    return names[codes.numpy()] if len(frame) else names[:0]
