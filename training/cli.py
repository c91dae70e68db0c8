"""The command line: ``LightningCLI`` over :class:`REMLModule` and :class:`MixedModelDataModule`.

.. code-block:: bash

    python -m training fit --config configs/field_trial.yaml          # or: covmodules-train fit
    python -m training fit --config configs/sleepstudy.yaml --trainer.max_epochs 20
    python -m training predict --config configs/sleepstudy.yaml --ckpt_path <fit's checkpoint>

A config has the sections ``model`` (optimiser, REML/ML, start values), ``data`` (the file and
the model spec, see :mod:`covmodules.specs`) and ``trainer``; by default the trainer logs to
TensorBoard under ``lightning_logs/``. A mistake in a config or an argument, in the data (a
missing column, a blank group label, a non-numeric response) or in ``--ckpt_path`` (missing,
truncated, of another model) ends the run with one line, ``error: <key>: <what is wrong>``,
and exit status 2.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from covmodules.specs import SpecError

from .callbacks import PredictionWriter
from .data import MixedModelDataModule
from .module import REMLModule

__all__ = ["REMLCLI", "build_cli", "run_cli", "main", "report", "check_checkpoint"]

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "lightning_logs", "name": "",
                             "default_hp_metric": False}},
    "log_every_n_steps": 1,
    "enable_model_summary": False,
    "max_epochs": 50,
}


class REMLCLI(LightningCLI):
    """LightningCLI whose parsers raise on a bad argument instead of printing usage."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``predict`` (a REML fit has no ``test`` loop)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "test"}

    def init_parser(self, **kwargs):
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def instantiate_trainer(self, **kwargs):
        """The trainer; a value it rejects is a :class:`SpecError` naming ``trainer.<key>``.
        ``predict`` without a prediction writer gets one writing to ``outputs/<config>/``."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ModuleNotFoundError, ValueError) as err:
            raise SpecError(_trainer_message(err)) from None
        if self.subcommand == "predict" and not any(
                isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter(f"outputs/{self._run_name or 'predict'}"))
        return trainer

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check ``ckpt_path`` (before LightningCLI reads its hyperparameters).

        ``--data.random.<term>.<key> value`` changes that key of the config's term (the
        parser alone would replace the whole ``random`` mapping by it)."""
        args, overrides = _random_overrides(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        configs = (self.config[subcommand].get("config") or []) if subcommand else []
        self._run_name = Path(str(configs[-1])).stem if configs else ""
        logger = self.config[subcommand].trainer.logger if subcommand else None
        if getattr(getattr(logger, "init_args", None), "name", None) == "":
            logger.init_args.name = self._run_name   # lightning_logs/<config>/version_N
        if subcommand == "predict":
            self.config.predict.trainer.logger = False   # predict writes CSV files, no logs
        if overrides and subcommand:
            random = dict(self.config[subcommand].data.random or {})
            for name, key, value in overrides:
                random[name] = {**(random.get(name) or {}), key: yaml.safe_load(value)}
            self.config[subcommand].data.random = random
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is not None and str(path).split(":")[0] not in _CKPT_KEYWORDS:
            check_checkpoint(path)


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


def check_checkpoint(path) -> None:
    """Check that ``path`` is a readable Lightning checkpoint: a missing, unreadable
    (truncated, corrupt) or foreign file is a :class:`SpecError` naming ``ckpt_path``."""
    file = Path(path)
    if not file.exists():
        raise SpecError(f"ckpt_path: file not found: {path}")
    if not file.is_file():
        raise SpecError(f"ckpt_path: {path} is not a file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:                # torch raises OSError, EOFError, RuntimeError, ...
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        raise SpecError(f"ckpt_path: cannot read checkpoint {path} (truncated or corrupt?): "
                        f"{type(err).__name__}: {reason}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise SpecError(f"ckpt_path: {path} is not a Lightning checkpoint (no state_dict)")


# ckpt_path values Lightning resolves itself instead of reading a file ("registry:<name>")
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")

_TRAINER_KEYS = set(inspect.signature(Trainer.__init__).parameters)

# jsonargparse and argparse messages, rewritten to "<key>: <what is wrong>"
_KEYED_MESSAGES = [
    (re.compile(r'^Parser key "([^"]+)":\s*(.*)$'), r"\1: \2"),
    (re.compile(r"^Subcommand '(\w+)' does not accept option '([^']+)'(.*)$"),
     r"\2: unknown key (\1 does not accept it)\3"),
    (re.compile(r"^argument --([\w.]+): (.*)$"), r"\1: \2"),
    (re.compile(r"^unrecognized arguments: --([\w.]+)(.*)$"),
     r"\1: unknown argument (--\1\2)"),
]


_RANDOM_KEY = re.compile(r"^--data\.random\.([^.=]+)\.([^.=]+)(?:=(.*))?$")


def _random_overrides(args):
    """``args`` without the ``--data.random.<term>.<key>`` options, and those as
    ``(term, key, value)``."""
    if not isinstance(args, (list, tuple)):
        return args, []
    rest, found, i = [], [], 0
    while i < len(args):
        match = _RANDOM_KEY.match(str(args[i]))
        if match and (match.group(3) is not None or i + 1 < len(args)):
            value = match.group(3) if match.group(3) is not None else args[i + 1]
            found.append((match.group(1), match.group(2), value))
            i += 1 if match.group(3) is not None else 2
            continue
        rest.append(args[i])
        i += 1
    return rest, found


def _one_line(err: Exception) -> str:
    """The most specific line of a (possibly nested, multi-line) parser message, as
    ``<key>: <what is wrong>`` where the message names the key."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = " ".join(lines) if len(lines) <= 2 else lines[0] + " " + lines[-1]
    for pattern, replacement in _KEYED_MESSAGES:
        if pattern.match(line):
            return pattern.sub(replacement, line)
    return line


def _trainer_message(err: Exception) -> str:
    """``trainer.<key>: <message>`` for the first Trainer argument the message names in
    backticks (```max_epochs``` or ```Trainer(devices=0)```), else ``trainer: <message>``."""
    message = " ".join(str(err).split())
    for name in re.findall(r"`(?:Trainer\()?(\w+)", message):
        if name in _TRAINER_KEYS:
            return f"trainer.{name}: {message}"
    return f"trainer: {message}"
