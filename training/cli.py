"""The command line: ``LightningCLI`` over :class:`REMLModule` and :class:`MixedModelDataModule`.

.. code-block:: bash

    python -m training fit --config configs/field_trial.yaml          # or: covmodules-train fit
    python -m training fit --config configs/sleepstudy.yaml --trainer.max_epochs 20
    python -m training predict --config configs/sleepstudy.yaml --ckpt_path <fit's checkpoint>

A config has the sections ``model`` (optimiser, REML/ML, start values), ``data`` (the file and
the model spec, see :mod:`covmodules.specs`) and ``trainer``; by default the trainer logs to
TensorBoard under ``lightning_logs/``. A mistake in a config ends the run with one line,
``error: <key>: <what is wrong>``, and exit status 2.
"""

from __future__ import annotations

import sys
from typing import Optional

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from covmodules.specs import SpecError

from .data import MixedModelDataModule
from .module import REMLModule

__all__ = ["REMLCLI", "build_cli", "run_cli", "main", "report"]

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "lightning_logs", "default_hp_metric": False}},
    "log_every_n_steps": 1,
    "enable_model_summary": False,
    "max_epochs": 50,
}


class REMLCLI(LightningCLI):
    """LightningCLI whose parsers raise on a bad argument instead of printing usage."""

    def init_parser(self, **kwargs):
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)


def build_cli(args=None, run: bool = True) -> REMLCLI:
    """Parse ``args`` (``sys.argv`` by default), build the module, data and trainer, and run the
    subcommand when ``run``."""
    return REMLCLI(REMLModule, MixedModelDataModule, args=args, run=run,
                   trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0,
                   save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


def main(args=None) -> int:
    """Run the CLI; print the fit summary and where the logs are. Returns the exit status."""
    cli = run_cli(args)
    if cli is None:
        return 2
    if cli.subcommand == "fit":
        report(cli)
    return 0


def run_cli(args=None) -> Optional[REMLCLI]:
    """:func:`build_cli` and run; a mistake in the config or arguments prints
    ``error: <key>: <what is wrong>`` on one line and returns ``None``."""
    try:
        return build_cli(args)
    except (SpecError, ArgumentError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return None


def report(cli: LightningCLI) -> None:
    """Print the fit summary, the checkpoint and the TensorBoard log directory (once: on the
    first process under DDP)."""
    if not cli.trainer.is_global_zero:
        return
    result = cli.model.result
    if result is not None:
        print(result.summary())
    checkpoint = cli.trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.last_model_path:
        print(f"\ncheckpoint: {checkpoint.last_model_path}")
    for logger in cli.trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            print(f"TensorBoard logs: {logger.log_dir}\n"
                  f"  open them with: tensorboard --logdir {logger.save_dir}")


def _one_line(err: Exception) -> str:
    """The most specific line of a (possibly nested, multi-line) parser message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 2 else lines[0] + " " + lines[-1]
