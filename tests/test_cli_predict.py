"""The command line's predict: b̂ and BLUPs from fit's checkpoint, any rows (no response
needed), the splits of the fit; a formula in the YAML config."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covmodules import lmm
from training.cli import main

from oracle import load_oracle

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["covmodules-train"])
    return tmp_path


def run(command, data, *extra):
    return main([command, "--config", str(ROOT / "configs/sleepstudy.yaml"),
                 "--data.path", str(data), *extra])


def test_predict_uses_the_checkpoint_and_needs_no_response(in_tmp, capsys):
    data = ROOT / "tests/data/sleepstudy.csv"
    assert run("fit", data, "--data.val_fraction", "0.2") == 0
    checkpoint = next(in_tmp.glob("lightning_logs/sleepstudy/version_0/checkpoints/last.ckpt"))
    saved = torch.load(checkpoint, weights_only=True)["fitted"]
    assert saved["x_names"] == ["(Intercept)", "Days"] and len(saved["splits"]["val"]) == 4

    # predict without val_fraction: the splits are the fit's; the rows' file has no response
    new = pd.DataFrame({"Days": [0.0, 5.0, 5.0], "Subject": [308, 999, 308]})
    new.to_csv(in_tmp / "new.csv", index=False)
    assert run("predict", in_tmp / "new.csv", "--ckpt_path", str(checkpoint)) == 0
    out = pd.read_csv(in_tmp / "outputs/sleepstudy/predictions.csv")
    assert "residual" not in out and len(out) == 3
    assert out.split[1] == "new" and out.split[0] in ("train", "val")

    # the same numbers as lmm on the training groups, b̂ from the checkpoint
    train = load_oracle("a")[0]
    train = train[train.Subject.astype(str).isin(saved["splits"]["train"])]
    result = lmm("Reaction ~ Days + (Days | Subject)", train)
    np.testing.assert_allclose(saved["beta"], result.fixed_effects.estimate, rtol=1e-6)
    expected = result.predict(new.assign(Subject=new.Subject.astype(str)))
    np.testing.assert_allclose(out.fitted, expected, rtol=1e-6)
    np.testing.assert_allclose(out.fitted_marginal,
                               result.predict(new.astype({"Subject": str}),
                                              include_random=False), rtol=1e-6)

    assert run("predict", data, "--ckpt_path", str(checkpoint)) == 0
    out = pd.read_csv(in_tmp / "outputs/sleepstudy/predictions.csv")
    assert out.split.value_counts().to_dict() == {"train": 140, "val": 40}


def test_yaml_formula_config(in_tmp, capsys):
    config = in_tmp / "ortho.yaml"
    config.write_text(
        "data:\n"
        f"  path: {ROOT / 'tests/data/Orthodont.csv'}\n"
        "  formula: distance ~ age * Sex + (age | Subject)\n"
        "  levels: {Sex: [Male, Female]}\n"
        "trainer:\n  max_epochs: 50\n  enable_progress_bar: false\n")
    assert main(["fit", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "logLik = -216.2908" in out and "age:SexFemale" in out
    assert main(["fit", "--config", str(config), "--data.random.Subject.structure", "diag"]) == 0
    assert "Subject/terms/sigma^2[1]" in capsys.readouterr().out


def test_overriding_one_key_of_a_random_term_keeps_the_others(in_tmp, capsys):
    data = ROOT / "tests/data/sleepstudy.csv"
    assert run("fit", data, "--data.random.Subject.structure", "diag",
               "--trainer.logger", "false") == 0
    out = capsys.readouterr().out
    ref = load_oracle("b")[1]                              # lme4's (1 | S) + (0 + Days | S)
    assert f"logLik = {ref['logLik_REML']:.4f}" in out and "Subject/terms/sigma^2[1]" in out


README_CONFIG = """\
model:
  optimizer: ai
data:
  path: {root}/tests/data/Ovary.csv
  response: follicles
  fixed: ["sin(2 * pi * Time)", "cos(2 * pi * Time)"]
  random:
    Mare: {{group: Mare}}
  residual: {{structure: ar1, subject: Mare}}
trainer:
  max_epochs: 50
"""


def test_a_three_section_config_logs_checkpoints_and_predicts(in_tmp, capsys):
    """The README's config (no logger, no callbacks): logs under lightning_logs/<config>/,
    its checkpoint holds the final state, predict writes outputs/<config>/predictions.csv."""
    (in_tmp / "mine.yaml").write_text(README_CONFIG.format(root=ROOT))
    assert main(["fit", "--config", "mine.yaml"]) == 0
    assert (in_tmp / "lightning_logs/mine/version_0").is_dir()
    checkpoint = next(in_tmp.glob("lightning_logs/mine/version_0/checkpoints/*.ckpt"))
    assert main(["predict", "--config", "mine.yaml", "--ckpt_path", str(checkpoint)]) == 0
    out = pd.read_csv(in_tmp / "outputs/mine/predictions.csv")
    assert len(out) == 308 and set(out.split) == {"train"}
    assert sorted(p.name for p in (in_tmp / "lightning_logs/mine").iterdir()) == ["version_0"]


def test_test_subcommand_is_a_one_line_error(in_tmp, capsys):
    (in_tmp / "mine.yaml").write_text(README_CONFIG.format(root=ROOT))
    assert main(["test", "--config", "mine.yaml"]) == 2
    err = capsys.readouterr().err
    assert "error: argument subcommand: invalid choice: 'test'" in err and "Traceback" not in err
