"""A deep mixed model in Lightning: an MLP mean plus a random-intercept covariance layer.

.. code-block:: bash

    python -m training.deep fit --config configs/lmmnn.yaml
    python -m training.deep fit --config configs/lmmnn.yaml --data.n 100000 --data.q 1000

:class:`LMMNNData` simulates the setting of LMMNN (Simchoni & Rosset, NeurIPS 2021):
``y = f(x) + u_g + e`` with ten ``U(-1, 1)`` features,
``f(x) = xβ cos(xβ) + 2 x₁x₂`` (``xβ = 1 + Σ x_j``), one categorical feature of ``q`` levels
(sizes from a multinomial over ``Poisson(3) + 1`` weights), ``u_g ~ N(0, sig2b)`` and
``e ~ N(0, sig2e)``; 20% of the rows, drawn at random, are the test set. Training batches hold
whole groups (:class:`~covmodules.GroupBatchSampler`).

:class:`DeepRandomIntercept` minimises the layer's per-row Gaussian NLL of each batch; before
each validation it fits the BLUPs from the whole training set at the current parameters, and
validation predicts ``f(x) + û_g`` (``f(x)`` for new groups). It logs to TensorBoard ``nll``,
``sigma2/intercept``, ``sigma2/residual`` and ``val_mse``; at the end the covariance images
of one group (``covariance/...``, with colour scales) and it prints the estimated variances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError

from covmodules import GroupBatchSampler, RandomIntercept

from .tensorboard import log_images

__all__ = ["Simulated", "simulate_intercepts", "simulate_repeated", "mlp", "LMMNNData",
           "DeepRandomIntercept", "DeepCLI", "main"]


@dataclass
class Simulated:
    """A simulated train/test split: float32 features and response, long group codes and
    positions (time points; zeros without repeated measures)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    g_train: torch.Tensor
    t_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    g_test: torch.Tensor
    t_test: torch.Tensor
    num_levels: int
    num_positions: int


def _mean_function(rng, n: int):
    x = rng.uniform(-1, 1, (n, 10))
    xb = 1 + x.sum(1)
    return x, xb * np.cos(xb) + 2 * x[:, 0] * x[:, 1]


def _split(rng, x, y, g, t, test_size, num_levels, num_positions) -> Simulated:
    perm = rng.permutation(len(y))
    k = int(round(test_size * len(y)))
    test, train = perm[:k], perm[k:]

    def part(rows):
        return (torch.as_tensor(x[rows], dtype=torch.float32),
                torch.as_tensor(y[rows], dtype=torch.float32),
                torch.as_tensor(g[rows], dtype=torch.long),
                torch.as_tensor(t[rows], dtype=torch.long))

    return Simulated(*part(train), *part(test), num_levels, num_positions)


def simulate_intercepts(n: int = 100_000, q: int = 1000, sig2b: float = 10.0,
                        sig2e: float = 1.0, test_size: float = 0.2, seed: int = 0) -> Simulated:
    """LMMNN's random-intercepts setting (see the module docstring)."""
    rng = np.random.default_rng(seed)
    x, f = _mean_function(rng, n)
    weights = rng.poisson(3, q) + 1
    g = np.repeat(np.arange(q), rng.multinomial(n, weights / weights.sum()))
    u = rng.normal(0, np.sqrt(sig2b), q)
    y = f + u[g] + rng.normal(0, np.sqrt(sig2e), n)
    return _split(rng, x, y, g, np.zeros(n, dtype=np.int64), test_size, q, 1)


def simulate_repeated(n: int = 100_000, q: int = 1000, sig2b: float = 10.0, sig2ar: float = 2.0,
                      rho: float = 0.8, sig2e: float = 1.0, test_size: float = 0.2,
                      seed: int = 0) -> Simulated:
    """Repeated measures: ``q`` subjects at ``T = n // q`` times ``0..T-1`` each,
    ``y = f(x) + u_g + a_gt + e`` with ``a_g·`` a stationary AR(1) (variance ``sig2ar``,
    correlation ``rho``) within subject."""
    rng = np.random.default_rng(seed)
    T = n // q
    x, f = _mean_function(rng, q * T)
    g, t = np.repeat(np.arange(q), T), np.tile(np.arange(T), q)
    a = np.empty((q, T))
    a[:, 0] = rng.normal(0, 1, q)
    for j in range(1, T):
        a[:, j] = rho * a[:, j - 1] + np.sqrt(1 - rho ** 2) * rng.normal(0, 1, q)
    u = rng.normal(0, np.sqrt(sig2b), q)
    y = f + u[g] + np.sqrt(sig2ar) * a.reshape(-1) + rng.normal(0, np.sqrt(sig2e), q * T)
    return _split(rng, x, y, g, t, test_size, q, T)


def mlp(in_features: int, hidden=(100, 50, 25, 12)) -> nn.Sequential:
    """LMMNN's network: ReLU layers of ``hidden`` widths and one linear output."""
    layers, width = [], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


class LMMNNData(L.LightningDataModule):
    """The simulated LMMNN data; training batches of ``groups_per_batch`` whole groups."""

    def __init__(self, n: int = 10_000, q: int = 100, sig2b: float = 10.0, sig2e: float = 1.0,
                 groups_per_batch: int = 8, test_size: float = 0.2, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.data: Optional[Simulated] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is None:
            h = self.hparams
            self.data = simulate_intercepts(h.n, h.q, h.sig2b, h.sig2e, h.test_size, h.seed)

    def train_dataloader(self) -> DataLoader:
        d = self.data
        h = self.hparams
        sampler = GroupBatchSampler(d.g_train, h.groups_per_batch, seed=h.seed)
        return DataLoader(TensorDataset(d.x_train, d.y_train, d.g_train), sampler=sampler,
                          batch_size=None)

    def val_dataloader(self) -> DataLoader:
        d = self.data
        return DataLoader(TensorDataset(d.x_test, d.y_test, d.g_test), batch_size=4096)


class DeepRandomIntercept(L.LightningModule):
    """MLP mean ``f(x)`` plus :class:`~covmodules.RandomIntercept`, trained by the Gaussian NLL.

    The network trains at ``lr``, the two variances (free scale) at ``covariance_lr``.
    """

    def __init__(self, num_levels: int = 100, num_features: int = 10,
                 hidden: tuple[int, ...] = (100, 50, 25, 12), lr: float = 1e-3,
                 covariance_lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(num_features, hidden)
        self.layer = RandomIntercept(num_levels)
        self.val_mse = MeanSquaredError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y, g = batch
        loss = self.layer.nll(y, self(x), g, reduction="mean")
        self.log("nll", loss, batch_size=len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        v = self.layer.variance_components
        self.log_dict({"sigma2/intercept": v["intercept/sigma^2"],
                       "sigma2/residual": v["residual/sigma^2"]})

    def on_validation_epoch_start(self) -> None:
        d = self.trainer.datamodule.data
        with torch.no_grad():
            mean = self(d.x_train.to(self.device))
            self.layer.fit_blups(d.y_train.to(self.device), mean, d.g_train.to(self.device))

    def validation_step(self, batch, batch_idx):
        x, y, g = batch
        self.val_mse(self.layer.predict(self(x), g), y)
        self.log("val_mse", self.val_mse, prog_bar=True)

    def on_train_end(self) -> None:
        """Log the covariance images of one group (as the REML module does) and print the
        estimated variances."""
        g = self.trainer.datamodule.data.g_train
        with torch.no_grad():
            model = self.layer.batch_model(g[g == g[0]])
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_images(model, logger.experiment, self.global_step, 100)
        if self.trainer.is_global_zero:
            print("\nCovariance layer estimates:")
            for name, value in self.layer.variance_components.items():
                print(f"  {name:<20} {value:.6g}")

    def configure_optimizers(self):
        return torch.optim.Adam([
            {"params": self.net.parameters(), "lr": self.hparams.lr},
            {"params": self.layer.parameters(), "lr": self.hparams.covariance_lr}])


class DeepCLI(LightningCLI):
    """LightningCLI with ``model.num_levels`` taken from ``data.q``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.q", "model.num_levels")


def main(args=None) -> LightningCLI:
    """``python -m training.deep fit --config configs/lmmnn.yaml``."""
    return DeepCLI(DeepRandomIntercept, LMMNNData, args=args, seed_everything_default=0,
                   save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
