"""The CLI: every shipped config runs and converges, logs reach TensorBoard, predict writes CSV,
and mistakes in a config are one-line errors naming the key."""

import json
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.cli import build_cli, main
import training.main
from training.main import NLME, comparison

from oracle import load_oracle

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"field_trial": "data/sim_field_40x40.csv", "sleepstudy": "tests/data/sleepstudy.csv",
           "ovary": "tests/data/Ovary.csv"}


pytestmark = pytest.mark.usefixtures("one_thread")


def args(name, *extra, command="fit"):
    return [command, "--config", str(ROOT / "configs" / f"{name}.yaml"),
            "--data.path", str(ROOT / CONFIGS[name]), *extra]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["covmodules-train"])
    return tmp_path


def test_field_trial_config_matches_nlme_and_logs_to_tensorboard(in_tmp):
    cli = build_cli(args("field_trial", "--model.image_every_n_epochs", "3"))
    result = cli.model.result
    assert result.converged and result.solver and result.n == 1600 and result.objective.p == 115
    table = comparison(result.params, result.loglik)
    assert abs(result.loglik - NLME["logLik_REML"]) < 1e-6, table
    for line in table.splitlines()[1:]:
        assert abs(float(line.split()[-1])) < 1e-5, table

    log_dir = Path(cli.trainer.logger.log_dir).resolve()
    assert log_dir.is_relative_to(in_tmp / "lightning_logs" / "field_trial")
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {f"param/{n}" for n in result.model.param_names} <= set(tags["scalars"])
    assert "param/residual/field/row/rho" in tags["scalars"]
    assert {"loss", "loglik", "grad_norm", "ai/step", "ai/halvings", "hp/loglik", "hp/aic",
            "hp/bic"} <= set(tags["scalars"])
    assert {"covariance/residual/field/row", "covariance/residual/field/col",
            "covariance/residual/nugget", "covariance/V"} <= set(tags["images"])
    assert {"blups/residual/field", "blups/residual/nugget"} <= set(tags["histograms"])
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert events.Scalars("hp/bic")[-1].value == pytest.approx(result.bic)
    assert Path(cli.trainer.checkpoint_callback.last_model_path).is_file()


@pytest.mark.parametrize("name, model_id", [("sleepstudy", "a"), ("ovary", "g2")])
def test_config_fits_like_r(name, model_id, in_tmp):
    cli = build_cli(args(name))
    result = cli.model.result
    assert result.converged
    assert abs(result.loglik - load_oracle(model_id)[1]["logLik_REML"]) < 1e-6


def test_fit_then_predict_writes_csv(in_tmp, capsys):
    assert main(args("sleepstudy", "--data.val_fraction", "0.2")) == 0
    out = capsys.readouterr().out
    assert "Linear mixed model fit by REML" in out and "tensorboard --logdir" in out
    checkpoint = next(in_tmp.glob("lightning_logs/sleepstudy/version_0/checkpoints/last.ckpt"))
    assert "; converged in " in out
    assert torch.load(checkpoint, weights_only=True)["reml"]["converged"]
    assert main(args("sleepstudy", "--data.val_fraction", "0.2", "--ckpt_path",
                     str(checkpoint), command="predict")) == 0
    predictions = pd.read_csv(in_tmp / "outputs/sleepstudy/predictions.csv")
    assert len(predictions) == 180 and predictions.split.value_counts().to_dict() == {
        "train": 140, "val": 40}
    assert {"fitted", "fitted_marginal", "residual", "Reaction", "Subject"} <= \
        set(predictions.columns)
    blups = pd.read_csv(in_tmp / "outputs/sleepstudy/blups.csv")
    assert len(blups) == 14 * 2 and set(blups.coefficient) == {"(Intercept)", "Days"}


def test_predict_without_fitted_parameters_is_an_error(in_tmp, capsys):
    assert main(args("ovary", command="predict")) == 2
    assert "error: predict needs fitted parameters" in capsys.readouterr().err


BAD = [
    ({"data": {"fixed": ["Dayz"]}}, "error: data.fixed: unknown column 'Dayz'"),
    ({"data": {"residual": {"structure": "ar2"}}},
     "error: data.residual.structure: unknown structure 'ar2'"),
    ({"data": {"fix": {"residual/sigma": 1.0}}},
     "error: data.fix.residual/sigma: unknown parameter"),
    ({"model": {"start": {"Subject/sigma^2": 1.0}}},
     "error: model.start.Subject/sigma^2: unknown parameter"),
    ({"data": {"respone": "Reaction"}}, "data.respone"),
    ({"model": {"optimizer": "adamw"}}, "model.optimizer"),
    ({"model": {"method": "reml2"}}, "model.method"),
    ({"model": {"reml": False}}, "model.reml"),            # the former key: method: ml now
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_config_is_one_line_naming_the_key(change, message, in_tmp, capsys):
    config = in_tmp / "bad.yaml"
    config.write_text(json.dumps(change))        # YAML is a superset of JSON
    code = main(args("sleepstudy", "--config", str(config)))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: ")
    assert message in errors[0]
    assert "Traceback" not in errors[0]


def test_main_job_bad_argument_is_one_line(in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(training.main, "CONFIG", str(ROOT / "configs" / "field_trial.yaml"))
    assert training.main.main(["--data.path", "missing.csv"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["error: data.path: file not found: missing.csv"]


def test_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["covmodules-train"] == "training.cli:main"
