"""The state of a Lightning REML fit: what it carries between steps and into checkpoints.

:class:`Run` holds it (the history, convergence, boundary, the torch optimisers' last loss, the
start and the AI-REML run to continue); :class:`AIStep` is AI-REML as a torch optimiser, whose
run :class:`Run` saves; :func:`load_own_data` and :func:`save_last_checkpoints` read and write
checkpoints (each process keeps its own data; the last checkpoint holds the final state).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import lightning as L
import torch

from covmodules.base import CovarianceModule, Structure
from covmodules.optim import AIREML
from covmodules.reml import REML
from covmodules.specs import SpecError

__all__ = ["Run", "AIStep", "load_own_data", "save_last_checkpoints"]


@dataclasses.dataclass
class Run:
    """A fit's state between steps, saved in checkpoints (:meth:`state_dict`).

    Attributes:
        history: one record per step (``iteration``, ``loglik``; AI-REML's step records).
        converged: whether the fit met its stop rule.
        boundary: the parameters left at the boundary of the parameter space.
        previous_loss: the torch optimisers' loss at the previous step (their stop rule).
        start: the free-scale start of a fresh fit (``None`` when resumed).
        ai: the AI-REML run to continue (:meth:`AIREML.state_dict
            <covmodules.optim.AIREML.state_dict>`), ``None`` before it starts.
    """

    history: list[dict] = dataclasses.field(default_factory=list)
    converged: bool = False
    boundary: list[str] = dataclasses.field(default_factory=list)
    previous_loss: Optional[float] = None
    start: Optional[list[float]] = None
    ai: Optional[dict] = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Run":
        """The run saved by :meth:`state_dict` (missing keys take their defaults)."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})


class AIStep(torch.optim.Optimizer):
    """AI-REML as a torch optimiser: each :meth:`step` is one :meth:`AIREML.step
    <covmodules.optim.AIREML.step>` on ``objective()``, written back to the model's parameters.

    :meth:`begin` starts the run at free-scale ``start`` (or continues a saved run);
    :attr:`last` is the last step's history record, ``None`` once the run has ended.
    """

    def __init__(self, objective: Callable[[], REML], tol: float = 1e-10):
        model = objective().model
        super().__init__([p for p in model.parameters() if p.requires_grad], {})
        self.objective, self.tol = objective, tol
        self.run: Optional[AIREML] = None
        self.last: Optional[dict] = None

    def begin(self, start: torch.Tensor, saved: Optional[dict] = None) -> None:
        """Start at ``start``, or continue the run saved by ``AIREML.state_dict``."""
        self.run = AIREML(self.objective(), max_iter=10 ** 9, tol=self.tol)
        if saved is None:
            self.run.start(start)
        else:
            self.run.load_state_dict(saved)

    @torch.no_grad()
    def step(self, closure=None):
        self.last = self.run.step()
        self.objective().model.set_free_params(self.run.free)


def load_own_data(covariance: CovarianceModule, own: dict, saved: dict, path: str) -> None:
    """Put this process's data buffers (group codes, designs: ``own``'s, the state dict of a
    module whose ``covariance.`` holds the model) into the checkpoint's state dict ``saved``,
    which holds the saving process's; refuse the checkpoint at ``path`` when its keys are
    not this model's: a :class:`SpecError` naming what each lacks."""
    params = {".".join(filter(None, ("covariance", name, spec.name)))
              for name, m in covariance.named_modules() if isinstance(m, Structure)
              for spec in m.param_specs}
    saved.update({k: v for k, v in own.items()
                  if k.startswith("covariance.") and k not in params})
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise SpecError(f"ckpt_path: {path} is a checkpoint of another model: this model "
                        f"has {_names(missing)}, which the checkpoint lacks; the checkpoint "
                        f"has {_names(unexpected)}, which this model lacks (load it with "
                        "the config that wrote it)")


def save_last_checkpoints(trainer: L.Trainer) -> None:
    """Write the final state (``converged``, the ended AI-REML run) into each
    ``ModelCheckpoint``'s last checkpoint: Lightning rewrites it only together with a new
    top-k one, so it misses the final steps when they do not improve the monitored value
    (the AI-REML step that confirms convergence). A checkpoint callback without a monitored
    value (Lightning's default one) keeps the latest checkpoint: it gets the final state too."""
    for callback in trainer.checkpoint_callbacks:
        path = callback.last_model_path
        if callback.save_last and path:
            if trainer.is_global_zero and os.path.islink(path):
                os.remove(path)             # save_last="link": a file of its own now
            trainer.save_checkpoint(path)
        if callback.monitor is None and callback.best_model_path:
            trainer.save_checkpoint(callback.best_model_path)


def _names(keys: list[str], shown: int = 3) -> str:
    """State-dict keys as parameter-style names, the first ``shown`` of them."""
    names = [k.removeprefix("covariance.").replace(".", "/") for k in keys]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "nothing") + more
