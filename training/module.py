"""``REMLModule``: a covariance model fitted by REML (or ML) as a LightningModule.

One training step is one optimiser step on the REML loss of the whole training set:

- ``ai``: one AI-REML iteration (:meth:`covmodules.optim.AIREML.step`) per step, by manual
  optimisation through :class:`AIStep`; the run keeps its state (damping, boundary) between
  steps and in checkpoints, so the iterations are those of :func:`covmodules.fit`;
- ``lbfgs``, ``adam``, ``sgd``: the torch optimiser on the loss, whose backward pass runs
  through the covariance modules' closed-form gradients; LBFGS re-evaluates it in a closure.

The optimisers are set up as :func:`covmodules.fit` sets them up and stop on the same rule,
so a Lightning fit ends at the estimates of the plain fit.

**Batches and processes.** With a :class:`~training.data.MixedModelDataModule` whose training
groups are split into several batches (``groups_per_batch``) or over processes
(``Trainer(strategy="ddp", devices=N, num_nodes=M)``), the objective is the
:class:`~covmodules.distributed.ShardedREML` of this process's batches: every REML quantity is
a sum over groups, so each step sums the batches' statistics and all-reduces them, and the
loss, gradient and AI matrix are those of the whole training set on every process. AI-REML
then takes the same steps everywhere; the torch optimisers get the exact gradient from DDP's
gradient averaging (the loss's backward returns ``world_size ×`` the local share). Fitted
values and BLUPs come per batch, in one process (:meth:`REMLModule.predict_step`). Rows of
crossed terms are split by rows: a :class:`~covmodules.crossed.CrossedREML`, one reduction.

Logged per step: ``loss``, ``loglik``, ``grad_norm``, ``param/<name>`` (natural scale, an
unstructured ``G`` as ``sigma^2[i]``, ``sd[i]``, ``rho[i,j]`` too), AI-REML's ``ai/*``; at the
end the heatmaps, BLUP histograms, summary, hparams of :mod:`training.tensorboard`. The last
checkpoint holds the final state, ``params``, ``b̂``, the BLUPs and the data for ``predict``.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics import MeanSquaredError, R2Score

from covmodules import CovarianceModule
from covmodules.checks import Checks
from covmodules.crossed import CrossedREML
from covmodules.distributed import ShardedREML, world_size
from covmodules.threads import per_process
from covmodules.fitting import (METHODS, OPTIMIZERS, fit_result, free_parameters,
                                loss_converged, start_values, torch_optimizer)
from covmodules.natural import natural_params
from covmodules.reml import REML
from covmodules.results import FitResult
from covmodules.specs import Problem, SpecError
from covmodules.validation import as_data

from .data import Batch, Rows, loader
from .metrics import REMLStatistics
from .prediction import (blup_table, fitted_state, own_data_frame, predict_rows,
                         saved_blup_table)
from .run import AIStep, Run, load_own_data, save_last_checkpoints
from .tensorboard import log_final, log_images, log_layout, plotted

__all__ = ["REMLModule", "AIStep"]

# every process logs the same numbers (the objective is the whole training set's);
# sync_dist says so to Lightning under DDP (the mean of equal values)
_EPOCH = {"on_step": False, "on_epoch": True, "batch_size": 1, "sync_dist": True}


class REMLModule(L.LightningModule):
    """A covariance model fitted by REML (or ML) in Lightning (see the module docstring).

    Give the model and data directly (``REMLModule(model, y, X)``, then
    ``Trainer().fit(module)``), or leave them out and fit with a
    :class:`~training.data.MixedModelDataModule`, which builds them from its spec.
    After ``fit``, :attr:`result` is the :class:`~covmodules.results.FitResult`. Under DDP a
    module given ``covariance`` and ``y`` fits all of them on every process (exact, no faster);
    the DataModule splits the groups over the processes.

    Args:
        covariance: the covariance module of ``y`` (e.g. a :class:`~covmodules.MixedModel`).
        y, X, x_names: response, fixed-effects design and its column names.
        optimizer: ``"ai"`` (AI-REML), ``"lbfgs"``, ``"adam"`` or ``"sgd"``.
        method: ``"reml"`` (default) or ``"ml"`` (profiled maximum likelihood).
        lr: learning rate of Adam / SGD (> 0).
        tol: convergence tolerance, as in :func:`covmodules.fit` (> 0).
        start: natural-scale start values by parameter name (default: the data-driven start
            of :func:`covmodules.fit`).
        max_image_size: rows and columns shown of each covariance heatmap.
        image_every_n_epochs: also log the images every this many epochs (0: at the end only).
        checks: the design checks of the REML objective (:class:`covmodules.checks.Checks`,
            default all; not saved in checkpoints: pass it again when loading one).
    """

    def __init__(self, covariance: Optional[CovarianceModule] = None,
                 y: Optional[torch.Tensor] = None, X: Optional[torch.Tensor] = None,
                 x_names: Optional[list[str]] = None,
                 optimizer: Literal["ai", "lbfgs", "adam", "sgd"] = "ai",
                 method: Literal["reml", "ml"] = "reml", lr: float = 0.05, tol: float = 1e-10,
                 start: Optional[dict[str, float]] = None, max_image_size: int = 100,
                 image_every_n_epochs: int = 0, checks: Optional[Checks] = None):
        super().__init__()
        for key, value, choices in (("optimizer", optimizer, OPTIMIZERS),
                                    ("method", method, METHODS)):
            if value not in choices:
                raise SpecError(f"model.{key}: unknown {key} {value!r}; choose one of "
                                f"{list(choices)}")
        for key, value, low in (("lr", lr, 0), ("tol", tol, 0)):
            if not value > low:
                raise SpecError(f"model.{key}: must be > {low}, got {value}")
        for key, value, low in (("max_image_size", max_image_size, 1),
                                ("image_every_n_epochs", image_every_n_epochs, 0)):
            if not value >= low:
                raise SpecError(f"model.{key}: must be >= {low}, got {value}")
        if (covariance is None) != (y is None):
            raise ValueError("give covariance and y together (X optional), or neither and fit "
                             "with a MixedModelDataModule")
        self.save_hyperparameters(ignore=["covariance", "y", "X", "x_names", "checks"],
                                  logger=False)        # the hparams table is fit_hparams
        self.checks = checks
        self.automatic_optimization = optimizer != "ai"
        self.covariance = covariance
        self.register_buffer("y", None, persistent=False)
        self.register_buffer("X", None, persistent=False)
        self.x_names = x_names
        if covariance is not None:
            self._set_data(y, X, x_names)
        # float64 sums: the processes' partial sums then add up to the one-process value
        self.val_mse, self.val_r2 = (MeanSquaredError().set_dtype(torch.float64),
                                     R2Score().set_dtype(torch.float64))
        self.val_loglik = REMLStatistics(method=method)
        self.run = Run()
        self.result: Optional[FitResult] = None
        self._shards: Optional[list[Problem]] = None      # the training batches, when split
        self._objective: Optional[REML | ShardedREML] = None
        self._step: dict = {}          # this step's first loss and gradient norm (torch optim)
        self._val_beta: Optional[torch.Tensor] = None
        self.fitted_state: Optional[dict] = None    # b̂, BLUPs, data: for predict (checkpoints)
        self._charted = False                      # whether the first step's params are logged

    def _set_data(self, y, X, x_names):
        self.y = as_data(y, "y", 1)          # REML's checks of the rest run at the first step
        self.X = (torch.ones(len(self.y), 1, dtype=torch.float64, device=self.y.device)
                  if X is None else as_data(X, "X", 2))
        self.x_names = (["(Intercept)"] if X is None else None) if x_names is None else x_names

    @property
    def history(self) -> list[dict]:
        """One record per step (see :class:`~training.run.Run`)."""
        return self.run.history

    @property
    def converged(self) -> bool:
        return self.run.converged

    @property
    def sharded(self) -> bool:
        """Whether the training set is split over batches or processes."""
        return self._shards is not None

    @property
    def objective(self) -> REML | ShardedREML:
        """The REML objective of the whole training set: :class:`REML`, the
        :class:`ShardedREML` of this process's batches, or the :class:`CrossedREML` of its
        rows of crossed terms (rebuilt after a device change)."""
        y = self._shards[0].y if self.sharded else self.y
        current, shards = self._objective, self._shards
        if current is None or current.device != y.device:
            if self.sharded and shards[0].shares_levels:      # rows of crossed terms
                self._objective = CrossedREML(shards[0].model, shards[0].y, shards[0].X,
                                              self.x_names, self.hparams.method, self.checks)
            elif self.sharded:
                self._objective = ShardedREML([(p.model, p.y, p.X) for p in shards],
                                              x_names=self.x_names, method=self.hparams.method,
                                              checks=self.checks)
            else:
                self._objective = self._reml(self.covariance, self.y, self.X, self.x_names)
        return self._objective

    def _reml(self, model, y, X, x_names) -> REML:
        return REML(model, y, X, x_names=x_names, method=self.hparams.method, checks=self.checks)

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        if getattr(self.trainer, "datamodule", None) is None:
            self.trainer.limit_val_batches = 0    # no held-out groups without a DataModule
        if self.covariance is None:
            batches = getattr(getattr(self.trainer, "datamodule", None), "train_batches", None)
            if not batches:
                if stage == "predict":    # rows without a response: the checkpoint's model
                    return
                raise ValueError("REMLModule has no model: pass covariance and y, or fit with a "
                                 "MixedModelDataModule")
            self._adopt(batches)
        self._check_start()

    def _adopt(self, batches: list[Batch]) -> None:
        """Take the model and data of the DataModule's training ``batches``."""
        first = batches[0].problem
        self.covariance, self._objective = first.model, None
        if len(batches) == 1 and self.trainer.world_size == 1:
            self._set_data(first.y, first.X, first.x_names)
        else:
            self._shards, self.x_names = [b.problem for b in batches], first.x_names

    def _check_start(self) -> None:
        # the data differ between processes: DDP must neither check nor broadcast them
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]
        names = self.covariance.param_names
        for name, value in (self.hparams.start or {}).items():
            if name not in names:
                raise SpecError(f"model.start.{name}: unknown parameter; the model's "
                                f"parameters are {names}")

    def configure_optimizers(self):
        name = self.hparams.optimizer
        if name == "ai":
            return AIStep(lambda: self.objective, tol=self.hparams.tol)
        return torch_optimizer(name, free_parameters(self.covariance), self.hparams.lr,
                               self.objective)

    def on_fit_start(self) -> None:
        local = getattr(self.trainer, "num_devices", 1)
        if self.device.type == "cpu" and local > 1 and self.trainer.world_size > 1:
            torch.set_num_threads(per_process(local))    # the cores split between processes
        for p in self._shards or []:
            p.model.to(self.device)
            p.y, p.X = p.y.to(self.device), p.X.to(self.device)
        if self.trainer.ckpt_path is None and not self.history:
            try:
                free = start_values(self.objective, self.hparams.start)
            except ValueError as err:
                raise SpecError(f"model.start: {err}") from None
            self.covariance.set_free_params(free)
            self.run.start = free.tolist()

    def train_dataloader(self) -> DataLoader:
        return loader([[Batch(self._own_problem(), "train")]])

    def val_dataloader(self) -> DataLoader:
        return loader([])

    def predict_dataloader(self) -> DataLoader:
        return loader([Batch(self._own_problem(), "train")])

    def _own_problem(self) -> Problem:
        frame = pd.DataFrame(index=pd.RangeIndex(len(self.y)))
        return Problem(self.covariance, self.y, self.X, list(self.x_names or []), frame)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: list[Batch], batch_idx: int):
        """One optimiser step on the whole training set (``batch``: this process's batches,
        which :attr:`objective` already holds)."""
        if self.hparams.optimizer == "ai":
            return self._ai_step()
        loss = self.objective.loss()
        if "loss" not in self._step:           # LBFGS evaluates it again in its line search
            self._step["loss"] = float(loss.detach())
            self.log("loss", loss.detach(), prog_bar=True, **_EPOCH)
            self.log("loglik", -loss.detach(), prog_bar=True, **_EPOCH)
        return loss

    def _ai_step(self):
        ai = self.optimizers().optimizer
        if ai.run is None:
            start = self.run.start            # resumed: continue the saved run, or from here
            ai.begin(self.covariance.free_params().to(torch.float64) if start is None
                     else torch.tensor(start, dtype=torch.float64), self.run.ai)
        self.optimizers().step()
        record = ai.last
        if record is not None:
            loglik = record["loglik"]
            self.log("grad_norm", _f64(record["score_norm"]), **_EPOCH)
            for key in ("step", "halvings", "decrement"):
                self.log(f"ai/{key}", _f64(record[key]), **_EPOCH)
            self.history.append(dict(record))
        else:
            end = ai.run.result()
            loglik, self.run.converged, self.run.boundary = end.loglik, end.converged, end.boundary
            self.trainer.should_stop = True
        self.log("loss", _f64(-loglik), prog_bar=True, **_EPOCH)
        self.log("loglik", _f64(loglik), prog_bar=True, **_EPOCH)
        return _f64(-loglik)

    def on_train_start(self) -> None:
        log_layout(list(plotted(self.covariance.params, self.covariance)),
                   self.hparams.optimizer == "ai", self.loggers)
        if self.converged:                  # resumed from the checkpoint of a finished fit
            self.trainer.should_stop = True

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step = {}

    def on_before_optimizer_step(self, optimizer) -> None:
        if "grad_norm" not in self._step:
            grads = [p.grad.abs().max() for p in self.covariance.parameters() if p.grad is not None]
            self._step["grad_norm"] = float(max(grads)) if grads else 0.0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.automatic_optimization:
            self.log("grad_norm", _f64(self._step.get("grad_norm", 0.0)), **_EPOCH)
        for name, value in self._plotted_params().items():
            self.log(f"param/{name}", _f64(value), **_EPOCH)

    def on_train_epoch_end(self) -> None:
        if self.automatic_optimization:             # one step per epoch: the epoch's loss
            loss, run = self._step["loss"], self.run
            self.history.append({"iteration": len(self.history) + 1, "loglik": -loss})
            previous, run.previous_loss = run.previous_loss, loss
            if previous is not None and loss_converged(previous, loss, self.hparams.tol,
                                                       self.objective.n):
                run.converged = True
                self.trainer.should_stop = True
        every = self.hparams.image_every_n_epochs
        if every and (self.current_epoch + 1) % every == 0:
            for logger in (lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)):
                log_images(self.covariance, logger.experiment, self.global_step,
                           self.hparams.max_image_size)

    def on_train_end(self) -> None:
        if not self.converged:
            rank_zero_warn(f"the REML fit stopped after {len(self.history)} steps without "
                           "converging; raise trainer.max_epochs")
        self.result = self.fit_result()
        self.fitted_state = fitted_state(self, self.trainer.datamodule)
        log_final(self, self.result, self.loggers)
        save_last_checkpoints(self.trainer)

    def fit_result(self) -> FitResult:
        """The :class:`~covmodules.results.FitResult` at the current parameters (on the CPU).

        Sharded, it is that of the whole training set on every process (its reductions run on
        all of them); its fitted values and BLUPs are :meth:`predict_step`'s."""
        objective = self.objective
        if not self.sharded and self.y.device.type != "cpu":
            objective = self._reml(copy.deepcopy(self.covariance).cpu(), self.y.cpu(),
                                   self.X.cpu(), self.x_names)
        free = objective.model.free_params().to(torch.float64)
        boundary = list(self.run.boundary) if self.hparams.optimizer == "ai" else None
        result = fit_result(objective, free, self.converged, len(self.history),
                            self.hparams.optimizer, self.history, boundary)
        self.run.boundary = list(result.boundary)
        return result

    # --------------------------------------------------------------- monitoring
    def _plotted_params(self) -> dict:
        """The parameters charted per step (natural scale): fixed ones only at the first step,
        a point instead of a flat line."""
        params, first = natural_params(self.covariance), not self._charted
        self._charted = True
        return params if first else plotted(params, self.covariance)

    # --------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        free = self.covariance.free_params().to(torch.float64)
        self._val_beta = self.objective.state(free).beta

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        p = batch.problem
        X = self._kept_columns(p).to(self._val_beta)
        prediction = X @ self._val_beta
        y = p.y.to(prediction)
        self.val_mse.update(prediction, y)
        self.val_r2.update(prediction, y)
        with torch.no_grad():
            V = p.model(self.covariance.free_params().to(torch.float64))
        self.val_loglik.update(V, y, X)

    def on_validation_epoch_end(self) -> None:
        if self.val_loglik.update_count == 0:
            return
        for name, metric in (("mse", self.val_mse), ("r2", self.val_r2),
                             ("loglik", self.val_loglik)):
            self.log(f"val/{name}", _f64(metric.compute()), prog_bar=name == "mse", **_EPOCH)
            metric.reset()

    def _kept_columns(self, problem: Problem) -> torch.Tensor:
        """Columns of ``problem.X`` the training objective kept (aliased ones dropped)."""
        index = [problem.x_names.index(name) for name in self.objective.x_names]
        return problem.X[:, index]

    # ------------------------------------------------------------------ predict
    def on_predict_start(self) -> None:
        if world_size() > 1:
            raise SpecError("predict runs in one process (trainer.devices: 1, num_nodes: 1); "
                            "a checkpoint written by a DDP fit loads there")
        if not self.history:
            raise SpecError("predict needs fitted parameters: run fit first, or pass "
                            "--ckpt_path with a checkpoint written by fit")
        if self.fitted_state is None and getattr(self.trainer, "datamodule", None) is not None:
            raise SpecError("ckpt_path: the checkpoint holds no fitted b̂ and BLUPs (written "
                            "before the fit ended): predict with the fit's last.ckpt")
        if self.fitted_state is None:
            self.result = self.fit_result()

    def predict_step(self, batch: Rows | Batch, batch_idx: int) -> pd.DataFrame:
        """Predictions of the batch's rows (:func:`~training.prediction.predict_rows`) from the
        fitted ``b̂`` and BLUPs: ``split`` (``train`` / ``val`` / ``new`` group),
        ``fitted_marginal`` (``X b̂``), ``fitted`` (plus the random effects) and, when the
        rows have the response, ``residual``."""
        if isinstance(batch, Rows):
            return predict_rows(self.fitted_state, self.trainer.datamodule.spec, batch.frame)
        p = batch.problem
        return own_data_frame(self.result, self._kept_columns(p), p.y, p.frame)

    def _batch_result(self, problem: Problem) -> FitResult:
        """:attr:`result` seen from a training batch, for its fitted values and BLUPs
        (:meth:`FitResult.shard` of a split training set)."""
        if not self.result.sharded:
            return self.result
        return self.result.shard(next(i for i, q in enumerate(self._shards) if q is problem))

    def blup_table(self) -> pd.DataFrame:
        """BLUPs of the random terms, one row per (term, level, coefficient)."""
        if self.result is None and self.fitted_state is not None:
            return saved_blup_table(self.fitted_state)
        return blup_table([self._batch_result(p) for p in self._shards] if self.sharded
                          else [self.result])

    # ---------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        ai = getattr(self.optimizers(use_pl_optimizer=False), "run", None) \
            if self._trainer is not None and self.trainer.optimizers else None
        if ai is not None:
            self.run.ai = ai.state_dict()
        checkpoint["reml"] = self.run.state_dict()
        checkpoint["params"] = natural_params(self.covariance)     # natural scale, by name
        if self.fitted_state is not None:
            checkpoint["fitted"] = self.fitted_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.fitted_state = checkpoint.get("fitted")
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.fitted_state is not None and self.trainer.predicting and datamodule is not None:
            self._adopt(datamodule.fitted_batches(self.fitted_state))  # the fitted data's model
        if self.covariance is None:
            raise SpecError("REMLModule.load_from_checkpoint needs the model: pass covariance, y "
                            "and X, or give the checkpoint to Trainer.fit/predict(..., "
                            "datamodule=..., ckpt_path=...)")
        load_own_data(self.covariance, self.state_dict(), checkpoint.setdefault("state_dict", {}),
                      getattr(self._trainer, "ckpt_path", None) or "the checkpoint")
        self.run = Run.from_state_dict(checkpoint.get("reml", {}))


def _f64(value) -> torch.Tensor:
    """A float64 scalar tensor (``self.log`` keeps tensors' precision, floats become float32)."""
    return torch.as_tensor(value, dtype=torch.float64).detach()
