"""Callbacks: write what ``predict`` returns to CSV files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """After ``predict``, write ``predictions.csv`` (one line per data row: the data, the
    split, fitted values and residuals) and ``blups.csv`` (term, level, coefficient, BLUP)
    into ``output_dir``."""

    def __init__(self, output_dir: str = "predictions"):
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        frames = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        pd.concat(frames).to_csv(self.output_dir / "predictions.csv", index_label="data_row")
        pl_module.blup_table().to_csv(self.output_dir / "blups.csv", index=False)
        print(f"predictions written to {self.output_dir / 'predictions.csv'} and "
              f"{self.output_dir / 'blups.csv'}")
