"""TensorBoard for a person: custom-scalars layout, colour scales, no flat lines for fixed
parameters, an hparams table of the fit, and the deep model's covariance images."""

import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from training.cli import main
from training.monitoring import heatmap
from training.tensorboard import layout, with_scale

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def events(directory):
    acc = EventAccumulator(str(next(Path(directory).rglob("events.out.tfevents.*")).parent),
                           size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_colour_scale_runs_from_red_to_blue_with_labels():
    image = with_scale(heatmap(np.array([[1.0, -1.0], [0.5, 0.0]])), 1.0)
    assert image.shape[0] == 128 and image.shape[1] > 128 + 12
    bar = image[:, 128 + 4:128 + 16]
    assert bar[0, 0, 0] > bar[0, 0, 2] and bar[-1, 0, 2] > bar[-1, 0, 0]   # red top, blue bottom
    labels = image[:, 128 + 16:]
    assert (labels < 128).any(axis=2)[:12].any() and (labels < 128).any(axis=2)[-12:].any()


def test_layout_puts_loglik_and_parameters_first():
    cats = layout(["a/sigma^2", "residual/sigma^2"])
    assert list(cats)[:2] == ["fit", "parameters"]
    assert list(cats["parameters"]) == ["a/sigma^2", "residual/sigma^2"]


def test_reml_run_layout_hparams_and_fixed_parameters(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["covmodules-train"])
    assert main(["fit", "--config", str(ROOT / "configs/sleepstudy.yaml"), "--data.path",
                 str(ROOT / "tests/data/sleepstudy.csv"),
                 "--data.fix", '{"Subject/terms/L[1,0]": 0.5}']) == 0
    acc = events(tmp_path / "lightning_logs")
    assert acc.PluginTagToContent("custom_scalars")
    assert len(acc.Scalars("param/Subject/terms/L[1,0]")) == 1          # a point, no line
    assert len(acc.Scalars("param/residual/sigma^2")) > 2
    info = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    names = set(info.hparams)
    assert {"optimizer", "method", "solver", "converged", "iterations"} <= names
    assert not any(n.startswith("_") for n in names)
    assert info.hparams["method"].string_value == "REML"
    assert any(t.startswith("covariance/") for t in acc.Tags()["images"])


def test_deep_run_logs_covariance_images_and_prints_estimates(tmp_path, capsys):
    from training.deep import main as deep
    deep(["fit", "--config", str(ROOT / "configs/lmmnn.yaml"), "--data.n", "600",
          "--data.q", "12", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar",
          "false", "--trainer.enable_checkpointing", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert "Covariance layer estimates:" in capsys.readouterr().out
    images = set(events(tmp_path).Tags()["images"])
    assert "covariance/V" in images
