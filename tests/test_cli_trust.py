"""Trustworthy CLI runs: summaries and TensorBoard images never form the q × q G (or n × n V),
every bad input ends with one line ``error: <key>: <what>`` and exit status 2, and the last
checkpoint holds the final state of the fit."""

import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from covmodules.reml import REML
from covmodules.results import FitResult
from covmodules.specs import ModelSpec
from training import REMLModule
from training.cli import main
from training.monitoring import correlation, covariance_blocks, fitted_v_block

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SLEEPSTUDY = {"response": "Reaction", "fixed": ["Days"],
              "random": {"Subject": {"group": "Subject", "terms": ["1", "Days"]}}}

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------- nothing scales with q²
def many_levels(terms, levels=20_000):
    """A problem with ``levels`` levels of three rows each (q = levels × len(terms))."""
    x = np.tile([0.0, 1.0, 2.0], levels)
    df = pd.DataFrame({"y": np.sin(np.arange(3 * levels)) + x, "x": x,
                       "g": np.repeat(np.arange(levels), 3)})
    return ModelSpec.from_dict({"response": "y", "fixed": ["x"],
                                "random": {"g": {"group": "g", "terms": terms}}}).build(df)


def forbid(monkeypatch, *modules):
    """Make evaluating any of ``modules`` as a dense matrix fail the test."""
    for module in modules:
        monkeypatch.setattr(module, "_evaluate",
                            lambda nat, m=type(module).__name__: pytest.fail(f"{m} formed"))


@pytest.mark.parametrize("terms", [["1"], ["1", "x"]])
def test_summary_of_20000_levels_never_forms_g(terms, monkeypatch):
    p = many_levels(terms)
    model = p.model
    model.set_params({name: 0.3 if name.endswith("L[1,0]") else 1.0 + 0.5 * i
                      for i, name in enumerate(model.free_param_names)})
    objective = REML(model, p.y, p.X, x_names=p.x_names)
    free = model.free_params()
    state = objective.state(free)
    result = FitResult(objective, free, state, objective.average_information(free, state),
                       True, 0, "ai")
    G = model._modules["g"]
    if len(terms) == 1:                         # G = sigma^2 I_q
        S = torch.tensor([[model.get_param("g/sigma^2")]], dtype=torch.float64)
        forbid(monkeypatch, G, model, model.residual)
    else:                                       # G = I_L ⊗ S: S (k x k) may be formed
        S = G.operand_modules[1]().detach()
        forbid(monkeypatch, G, G.operand_modules[0], model, model.residual)
    assert "Random effects:" in result.summary()
    table = result.random_effects()
    assert list(table["name"]) == ["(Intercept)", "x"][:len(terms)]
    torch.testing.assert_close(torch.tensor(table["variance"].to_numpy()), S.diagonal())
    if len(terms) == 2:
        corr = S[1, 0] / (S[0, 0] * S[1, 1]).sqrt()
        assert abs(corr) > 0.1
        assert table["corr (Intercept)"].iloc[1] == pytest.approx(float(corr))


def test_tensorboard_images_of_20000_levels_are_one_level_blocks(monkeypatch):
    p = many_levels(["1", "x"])
    model = p.model
    G = model._modules["g"]
    S = G.operand_modules[1]().detach()
    forbid(monkeypatch, G, G.operand_modules[0], model, model.residual)
    blocks = covariance_blocks(model, 100)
    assert set(blocks) == {"g", "residual"}
    torch.testing.assert_close(blocks["g"], correlation(S))
    torch.testing.assert_close(blocks["residual"], torch.eye(100, dtype=torch.float64))
    V = fitted_v_block(model, 100)
    # rows 0-2 are level 0 at x = 0, 1, 2: there V = Z S Zᵀ + I, and levels do not mix
    Z = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    assert V.shape == (100, 100)
    torch.testing.assert_close(V[:3, :3], Z @ S @ Z.T + torch.eye(3, dtype=torch.float64))
    assert float(V[:3, 3:].abs().max()) == 0


@pytest.mark.parametrize("config", [
    SLEEPSTUDY,
    {"response": "follicles", "fixed": ["sin(2 * pi * Time)"], "random": {"Mare": {"group": "Mare"}},
     "residual": {"structure": "ar1", "subject": "Mare"}},
    {"response": "Reaction", "residual": {"structure": "cs", "subject": "Subject"}},
])
def test_image_blocks_equal_the_dense_matrices(config):
    data = "Ovary.csv" if config["response"] == "follicles" else "sleepstudy.csv"
    model = ModelSpec.from_dict(config).build(pd.read_csv(DATA / data)).model
    torch.manual_seed(0)
    model.set_free_params(0.3 * torch.randn(model.num_free_params, dtype=torch.float64))
    V = model().detach()
    torch.testing.assert_close(fitted_v_block(model, 25), V[:25, :25])
    blocks = covariance_blocks(model, 25)
    for name in model.term_names:
        k = len(model.terms[name])
        torch.testing.assert_close(blocks[name], correlation(model._modules[name]()[:k, :k]
                                                             .detach()))
    for name, module in model.residual.named_modules(prefix="residual"):
        if name.replace(".", "/") in blocks:
            n = min(25, module.shape[0])
            torch.testing.assert_close(blocks[name.replace(".", "/")],
                                       correlation(module().detach()[:n, :n]))


# ------------------------------------------------------------ one-line errors, status 2
@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["covmodules-train"])
    return tmp_path


def run(name, *extra, command="fit", data=None):
    """``main`` on config ``name`` with ``extra`` arguments: (exit status, stderr lines that
    mention an error, all of stderr) via capsys in the caller."""
    data = data or {"sleepstudy": DATA / "sleepstudy.csv", "ovary": DATA / "Ovary.csv"}[name]
    return main([command, "--config", str(ROOT / "configs" / f"{name}.yaml"),
                 "--data.path", str(data), "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", *extra])


def assert_one_line_error(code, capsys, message):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2, err
    assert len(errors) == 1 and errors[0].startswith(message), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def sleepstudy_checkpoint(tmp_path_factory):
    """A checkpoint of the sleepstudy model (one AI-REML step) and broken copies of it."""
    directory = tmp_path_factory.mktemp("ckpt")
    p = ModelSpec.from_dict(SLEEPSTUDY).build(pd.read_csv(DATA / "sleepstudy.csv"))
    callback = ModelCheckpoint(dirpath=directory, save_last=True)
    L.Trainer(default_root_dir=directory, max_epochs=1, logger=False, callbacks=[callback],
              enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").fit(REMLModule(p.model, p.y, p.X, p.x_names))
    good = Path(callback.last_model_path)
    data = good.read_bytes()
    for name, content in (("empty", b""), ("head", data[:100]), ("half", data[:len(data) // 2]),
                          ("tail", data[:-100])):
        (directory / f"{name}.ckpt").write_bytes(content)
    torch.save({"weights": torch.ones(2)}, directory / "foreign.ckpt")
    (directory / "folder.ckpt").mkdir()
    return directory, good


ARGUMENTS = [
    (["--trainer.max_epochs", "-3"], "error: trainer.max_epochs: "),
    (["--trainer.max_steps", "-5"], "error: trainer.max_steps: "),
    (["--trainer.devices", "0"], "error: trainer.devices: "),
    (["--trainer.max_epochs", "many"], "error: trainer.max_epochs: "),
    (["--data.groups_per_batch", "0"], "error: data.groups_per_batch: must be >= 1, got 0"),
    (["--data.groups_per_batch", "-2"], "error: data.groups_per_batch: must be >= 1, got -2"),
    (["--data.val_fraction", "1.0"], "error: data.val_fraction: must lie in [0, 1), got 1.0"),
    (["--data.val_fraction", "-0.1"], "error: data.val_fraction: must lie in [0, 1)"),
    (["--data.split_seed", "-1"], "error: data.split_seed: must be >= 0, got -1"),
    (["--data.response", "Reactionz"], "error: data.response: unknown column 'Reactionz'"),
    (["--data.path", "missing.csv"], "error: data.path: file not found: missing.csv"),
    (["--model.optimizer", "adamw"], "error: model.optimizer: "),
    (["--model.lr", "-1"], "error: model.lr: must be > 0, got -1.0"),
    (["--model.tol", "0"], "error: model.tol: must be > 0, got 0.0"),
    (["--model.max_image_size", "0"], "error: model.max_image_size: must be >= 1, got 0"),
    (["--model.image_every_n_epochs", "-1"], "error: model.image_every_n_epochs: must be >= 0"),
    (["--model.foo", "1"], "error: model.foo: unknown argument"),
    (["--ckpt_path", "missing.ckpt"], "error: ckpt_path: file not found: missing.ckpt"),
]


@pytest.mark.parametrize("extra, message", ARGUMENTS)
def test_bad_argument_is_one_line_naming_the_key(extra, message, in_tmp, capsys):
    assert_one_line_error(run("sleepstudy", *extra), capsys, message)


def test_unknown_config_key_is_one_line_naming_it(in_tmp, capsys):
    (in_tmp / "bad.yaml").write_text(json.dumps({"trainer": {"max_epochz": 3}}))
    code = run("sleepstudy", "--config", str(in_tmp / "bad.yaml"))
    assert_one_line_error(code, capsys, "error: trainer.max_epochz: unknown key")


def broken_copy(column, row, value, dtype=None):
    df = pd.read_csv(DATA / "sleepstudy.csv")
    if dtype is not None:
        df[column] = df[column].astype(dtype)
    df.loc[row, column] = value
    path = Path(f"{column}_{row}.csv")
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("column, value, dtype, extra, message", [
    ("Subject", None, object, [],
     "error: data.random.Subject.group: column 'Subject' has 1 missing or infinite value(s) "
     "(data rows 3)"),
    ("Days", np.nan, None, ["--data.residual", '{"structure": "ar1", "subject": "Subject", '
                                               '"time": "Days"}'],
     "error: data.residual.time: column 'Days' has 1 missing or infinite value(s)"),
    ("Reaction", "fast", str, [], "error: data.response: column 'Reaction' must be numeric"),
    ("Reaction", np.nan, None, [], "error: data.response: column 'Reaction' has 1 missing"),
])
def test_bad_data_is_one_line_naming_the_key(column, value, dtype, extra, message, in_tmp,
                                             capsys):
    path = broken_copy(column, 3, value, dtype)
    assert_one_line_error(run("sleepstudy", *extra, data=path), capsys, message)


def test_missing_value_in_the_group_column_is_one_line(in_tmp, capsys):
    df = pd.read_csv(DATA / "sleepstudy.csv")
    df["Site"] = (df["Subject"] % 3).astype(float)
    df.loc[7, "Site"] = np.nan
    df.to_csv("site.csv", index=False)
    code = run("sleepstudy", "--data.group", "Site", data=Path("site.csv"))
    assert_one_line_error(code, capsys, "error: data.group: column 'Site' has 1 missing or "
                                        "infinite value(s) (data rows 7)")


@pytest.mark.parametrize("name, message", [
    ("empty", "error: ckpt_path: cannot read checkpoint {} (truncated or corrupt?): EOFError"),
    ("head", "error: ckpt_path: cannot read checkpoint {} (truncated or corrupt?)"),
    ("half", "error: ckpt_path: cannot read checkpoint {} (truncated or corrupt?)"),
    ("tail", "error: ckpt_path: cannot read checkpoint {} (truncated or corrupt?)"),
    ("foreign", "error: ckpt_path: {} is not a Lightning checkpoint"),
    ("folder", "error: ckpt_path: {} is not a file"),
])
@pytest.mark.parametrize("command", ["fit", "predict"])
def test_bad_checkpoint_is_one_line_naming_the_file(name, message, command,
                                                    sleepstudy_checkpoint, in_tmp, capsys):
    path = sleepstudy_checkpoint[0] / f"{name}.ckpt"
    code = run("sleepstudy", "--ckpt_path", str(path), command=command)
    assert_one_line_error(code, capsys, message.format(path))


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_checkpoint_of_another_model_is_one_line(command, sleepstudy_checkpoint, in_tmp,
                                                 capsys):
    good = sleepstudy_checkpoint[1]
    code = run("ovary", "--ckpt_path", str(good), command=command)
    assert_one_line_error(code, capsys, f"error: ckpt_path: {good} is a checkpoint of another "
                                        "model: this model has Mare/sigma^2")
