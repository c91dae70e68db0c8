"""What a person sees in TensorBoard: charts in reading order, images with a colour scale,
an hparams table of the fit.

- :func:`layout`: a custom-scalars layout (TensorBoard's "Custom Scalars" tab) whose first
  charts are the log-likelihood and one chart per free parameter, then the optimiser's
  figures; fixed parameters get no chart (:func:`plotted`) and are logged once.
- :func:`with_scale`: a heatmap with its colour bar and the values at its ends and middle,
  drawn with NumPy (a 3 × 5 pixel font), so no plotting library is needed.
- :func:`fit_hparams`: the hparams table: optimiser, REML / ML, solver, sizes, iterations and
  the final log-likelihood, AIC and BIC (not the CLI's internal ``_instantiator`` keys).

>>> layout(["residual/sigma^2"])["fit"]["log-likelihood"]
['Multiline', ['^loglik$', '^val/loglik$']]
>>> with_scale(np.zeros((10, 10, 3), np.uint8), 2.0).shape
(40, 44, 3)
"""

from __future__ import annotations

import re

import numpy as np

from .monitoring import blup_values, covariance_blocks, fitted_v_block, heatmap

__all__ = ["layout", "plotted", "with_scale", "fit_hparams", "log_images", "log_final",
           "log_layout"]

_GLYPHS = {  # 3 x 5 pixel glyphs, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "000111101110111", " ": "000000000000000"}


def layout(param_names: list[str], ai: bool = True) -> dict:
    """The custom-scalars layout: log-likelihood, each parameter, then the optimiser."""
    params = {name: ["Multiline", [f"^param/{re.escape(name)}$"]] for name in param_names}
    steps = {"grad_norm": ["Multiline", ["^grad_norm$"]]}
    if ai:
        steps.update({"AI-REML step": ["Multiline", ["^ai/"]]})
    return {"fit": {"log-likelihood": ["Multiline", ["^loglik$", "^val/loglik$"]]},
            "parameters": params, "optimiser": steps,
            "validation": {"prediction": ["Multiline", ["^val/mse$", "^val/r2$"]]}}


def plotted(params: dict, covariance) -> dict:
    """``params`` without the fixed ones (a constant line says nothing)."""
    fixed = set(covariance.fixed_param_names)
    return {name: value for name, value in params.items() if name not in fixed}


def _text(label: str, scale: int = 2) -> np.ndarray:
    """A boolean ``(5 scale, 4 scale len)`` bitmap of ``label``."""
    cells = []
    for ch in label:
        glyph = np.array([int(b) for b in _GLYPHS.get(ch, _GLYPHS[" "])], bool).reshape(5, 3)
        cells += [glyph, np.zeros((5, 1), bool)]
    return np.concatenate(cells, 1).repeat(scale, 0).repeat(scale, 1)


def with_scale(image: np.ndarray, vmax: float, width: int = 12) -> np.ndarray:
    """``image`` (a :func:`~training.monitoring.heatmap`) with a colour bar from ``+vmax``
    (top) to ``-vmax`` (bottom) and those values written beside it."""
    height = max(image.shape[0], 40)
    bar = heatmap(np.linspace(vmax, -vmax, height)[:, None].repeat(width, 1), vmax,
                  min_pixels=1)
    labels = [f"{vmax:+.3g}", "0", f"{-vmax:+.3g}"]
    texts = [_text(t) for t in labels]
    column = np.full((height, max(t.shape[1] for t in texts) + 2, 3), 255, np.uint8)
    for text, top in zip(texts, (0, (height - 10) // 2, height - 10)):
        column[top:top + text.shape[0], 2:2 + text.shape[1]][text] = 0
    canvas = np.full((height, image.shape[1], 3), 255, np.uint8)
    canvas[:image.shape[0]] = image
    gap = np.full((height, 4, 3), 255, np.uint8)
    return np.concatenate([canvas, gap, bar, column], 1)


def fit_hparams(module, result) -> tuple[dict, dict]:
    """``(hparams, metrics)`` of a finished fit for the hparams table."""
    hp = module.hparams
    params = {"optimizer": hp.optimizer, "method": result.method, "solver": result.solver,
              "n": result.n, "p": result.objective.p,
              "covariance_parameters": result.model.num_free_params,
              "converged": result.converged, "iterations": result.iterations}
    if hp.optimizer in ("adam", "sgd"):
        params["lr"] = hp.lr
    metrics = {"hp/loglik": result.loglik, "hp/aic": result.aic, "hp/bic": result.bic}
    return params, metrics


def log_images(covariance, writer, step: int, size: int) -> None:
    """Heatmaps with scales of the covariance blocks of a model (correlation scale) and of the
    top-left ``size × size`` block of its ``V``."""
    for name, C in covariance_blocks(covariance, size).items():
        writer.add_image(f"covariance/{name}", with_scale(heatmap(C), 1.0), step,
                         dataformats="HWC")
    V = fitted_v_block(covariance, size)
    vmax = float(V.abs().max())
    writer.add_image("covariance/V", with_scale(heatmap(V, vmax=vmax), vmax), step,
                     dataformats="HWC")


def log_final(module, result, loggers) -> None:
    """The images, BLUP histograms, summary and hparams table at the end of a fit."""
    from lightning.pytorch.loggers import TensorBoardLogger
    params, metrics = fit_hparams(module, result)
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_metrics(metrics, module.global_step)
            continue
        writer, step = logger.experiment, module.global_step
        log_images(module.covariance, writer, step, module.hparams.max_image_size)
        for name, values in ({} if module.sharded else blup_values(result)).items():
            writer.add_histogram(f"blups/{name}", values, step)
        writer.add_text("summary", "    " + result.summary().replace("\n", "\n    "), step)
        logger.log_hyperparams(params, metrics=metrics)


def log_layout(param_names: list[str], ai: bool, loggers) -> None:
    """Write :func:`layout` of the plotted parameters to each TensorBoard logger."""
    from lightning.pytorch.loggers import TensorBoardLogger
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(layout(param_names, ai))
