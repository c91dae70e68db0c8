"""training: REMLModule == fit(), resume == uninterrupted, DataModule batches, metrics, logs."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from covmodules import fit
from covmodules.reml import REML
from covmodules.specs import ModelSpec, SpecError
from training import MixedModelDataModule, REMLModule, REMLStatistics

from oracle import DATA, load_oracle

SPECS = {
    "sleepstudy": ("a", {"response": "Reaction", "fixed": ["Days"],
                         "random": {"Subject": {"group": "Subject", "terms": ["1", "Days"]}}}),
    "ovary": ("g2", {"response": "follicles",
                     "fixed": ["sin(2 * pi * Time)", "cos(2 * pi * Time)"],
                     "random": {"Mare": {"group": "Mare"}},
                     "residual": {"structure": "ar1", "subject": "Mare"}}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def problem(name):
    model_id, config = SPECS[name]
    return ModelSpec.from_dict(config).build(load_oracle(model_id)[0])


def trainer(tmp_path, max_epochs=50, callbacks=(), logger=False):
    return L.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, logger=logger,
                     callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                     enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", log_every_n_steps=1)


def lightning_fit(p, tmp_path, **kwargs):
    module = REMLModule(p.model, p.y, p.X, p.x_names, **kwargs)
    trainer(tmp_path, max_epochs=200).fit(module)
    return module.result


@pytest.mark.parametrize("name, optimizer", [("sleepstudy", "ai"), ("ovary", "ai"),
                                             ("sleepstudy", "lbfgs")])
def test_lightning_fit_equals_plain_fit(name, optimizer, tmp_path):
    ours = lightning_fit(problem(name), tmp_path, optimizer=optimizer)
    p = problem(name)
    ref = fit(p.model, p.y, p.X, x_names=p.x_names, optimizer=optimizer)
    assert ours.converged and ref.converged and ours.iterations == ref.iterations
    assert abs(ours.loglik - ref.loglik) < 1e-6
    assert ours.params == pytest.approx(ref.params, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(torch.tensor(ours.fixed_effects.to_numpy()),
                               torch.tensor(ref.fixed_effects.to_numpy()), rtol=1e-6, atol=1e-9)
    assert abs(ours.loglik - load_oracle(SPECS[name][0])[1]["logLik_REML"]) < 1e-6


def test_ml_fit_equals_plain_fit(tmp_path):
    ours = lightning_fit(problem("sleepstudy"), tmp_path, method="ml")
    p = problem("sleepstudy")
    ref = fit(p.model, p.y, p.X, x_names=p.x_names, method="ml")
    assert ours.method == "ML" and abs(ours.loglik - ref.loglik) < 1e-6
    assert ours.params == pytest.approx(ref.params, rel=1e-6)


# Ovary's REML surface is so flat along (sigma^2, rho) that LBFGS's end point is pinned only to
# ~2e-8: there the comparison would test bit-level reproducibility rather than the restored
# state, so LBFGS resumes on sleepstudy, whose optimum is well determined.
@pytest.mark.parametrize("optimizer, stop_at, name", [("ai", 3, "ovary"),
                                                       ("lbfgs", 1, "sleepstudy")])
def test_resume_from_checkpoint_equals_uninterrupted(optimizer, stop_at, name, tmp_path):
    def run(directory, max_epochs, ckpt_path=None):
        p = problem(name)
        module = REMLModule(p.model, p.y, p.X, p.x_names, optimizer=optimizer)
        checkpoint = ModelCheckpoint(dirpath=directory, monitor="loglik", mode="max",
                                     save_last=True)
        trainer(tmp_path, max_epochs, [checkpoint]).fit(module, ckpt_path=ckpt_path)
        return module, checkpoint

    whole, _ = run(tmp_path / "whole", 200)
    stopped, checkpoint = run(tmp_path / "stopped", stop_at)
    assert not stopped.converged and len(stopped.history) == stop_at
    assert checkpoint.best_model_path and checkpoint.last_model_path
    resumed, _ = run(tmp_path / "resumed", 200, ckpt_path=checkpoint.last_model_path)
    assert resumed.converged and resumed.result.iterations == whole.result.iterations
    assert abs(resumed.result.loglik - whole.result.loglik) < 1e-8
    assert resumed.result.params == pytest.approx(whole.result.params, rel=1e-8, abs=1e-12)


def test_load_from_checkpoint_without_a_model_is_a_clear_error(tmp_path):
    p = problem("sleepstudy")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, 1, [checkpoint]).fit(REMLModule(p.model, p.y, p.X, p.x_names))
    with pytest.raises(SpecError, match="needs the model"):
        REMLModule.load_from_checkpoint(checkpoint.last_model_path)
    p2 = problem("sleepstudy")
    loaded = REMLModule.load_from_checkpoint(checkpoint.last_model_path, covariance=p2.model,
                                             y=p2.y, X=p2.X, x_names=p2.x_names)
    assert len(loaded.history) == 1


def test_datamodule_batches_whole_groups_and_holds_out_groups(tmp_path):
    dm = MixedModelDataModule(str(DATA / "sleepstudy.csv"), response="Reaction",
                              fixed=["Days"], random={"Subject": {"group": "Subject",
                                                                 "terms": ["1", "Days"]}},
                              val_fraction=0.25, groups_per_batch=4)
    dm.setup("fit")
    subjects = [set(b.problem.frame.Subject) for b in dm.train_batches + dm.val_batches]
    assert sum(len(s) for s in subjects) == len(set().union(*subjects)) == 18
    assert [len(s) for s in subjects] == [4, 4, 4, 2, 4]      # 14 training, 4 held out
    assert all(len(b) == 10 * len(s) for b, s in zip(dm.train_batches + dm.val_batches,
                                                      subjects))
    assert set(dm.train_problem.frame.Subject) == set().union(*subjects[:4])
    module = REMLModule(optimizer="adam", lr=0.05)
    trainer(tmp_path, max_epochs=3).fit(module, datamodule=dm)
    history = [h["loglik"] for h in module.history]
    assert len(history) == 3 and history[-1] > history[0]


def test_validation_metrics(tmp_path):
    dm = MixedModelDataModule(str(DATA / "sleepstudy.csv"), response="Reaction",
                              fixed=["Days"], random={"Subject": {"group": "Subject",
                                                                 "terms": ["1", "Days"]}},
                              val_fraction=0.25)
    module = REMLModule()
    fitter = trainer(tmp_path)
    fitter.fit(module, datamodule=dm)
    metrics = fitter.validate(module, datamodule=dm, verbose=False)[0]
    val = dm.val_batches[0].problem
    y, X = val.y, val.X
    beta = module.result.state.beta
    assert float(metrics["val/mse"]) == pytest.approx(float(((y - X @ beta) ** 2).mean()))
    assert -1 < float(metrics["val/r2"]) < 1
    held_out = REML(val.model, y, X).loglik(module.covariance._registered_free().detach())
    assert float(metrics["val/loglik"]) == pytest.approx(held_out, rel=1e-10)


def test_reml_statistics_sum_over_batches_of_groups():
    p = problem("ovary")
    free = torch.tensor([0.3, 1.0, 0.5], dtype=torch.float64)
    whole = REML(p.model, p.y, p.X).loglik(free)
    metric = REMLStatistics()
    assert set(metric._reductions.values()) == {metric._reductions["A"]}
    assert all(fn.__name__.endswith("sum") for fn in metric._reductions.values())
    V = p.model(free).detach()
    codes = p.model.residual.group_codes
    for g in codes.unique():
        rows = (codes == g).nonzero()[:, 0]
        metric.update(V[rows][:, rows], p.y[rows], p.X[rows])
    assert float(metric.compute()) == pytest.approx(whole, rel=1e-12)


def test_tensorboard_logs_params_images_histograms_hparams(tmp_path):
    p = problem("sleepstudy")
    module = REMLModule(p.model, p.y, p.X, p.x_names, image_every_n_epochs=2)
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer(tmp_path, logger=logger).fit(module)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    names = module.covariance.param_names
    assert {f"param/{n}" for n in names} <= set(tags["scalars"])
    assert {"loss", "loglik", "grad_norm", "ai/step", "ai/halvings",
            "hp/loglik", "hp/aic", "hp/bic"} <= set(tags["scalars"])
    steps = [e.value for e in events.Scalars("param/residual/sigma^2")]
    assert len(steps) == module.result.iterations + 1     # the last epoch confirms convergence
    assert steps[-1] == pytest.approx(module.result.params["residual/sigma^2"])
    assert events.Scalars("hp/loglik")[0].value == pytest.approx(module.result.loglik)
    assert {"covariance/Subject", "covariance/residual", "covariance/V"} <= \
        set(tags["images"])
    assert len(events.Images("covariance/V")) > 1             # every 2 epochs and at the end
    assert tags["histograms"] == ["blups/Subject"]
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"hp/loglik" in hparams["_hparams_/experiment"]


def test_no_warnings_from_a_plain_lightning_fit(tmp_path):
    p = problem("ovary")
    module = REMLModule(p.model, p.y, p.X, p.x_names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path).fit(module)
    ours = [w for w in caught if "LeafSpec" not in str(w.message)]
    assert not ours, [str(w.message) for w in ours]


@pytest.mark.parametrize("optimizer", ["ai", "lbfgs"])
def test_last_checkpoint_holds_the_final_state(optimizer, tmp_path):
    # mode="min" on loglik: the only "best" epoch is the first, so Lightning alone would leave
    # last.ckpt at epoch 0, unconverged
    p = problem("sleepstudy")
    module = REMLModule(p.model, p.y, p.X, p.x_names, optimizer=optimizer)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="loglik", mode="min", save_last=True)
    trainer(tmp_path, 200, [checkpoint]).fit(module)
    assert module.converged and len(module.history) > 1
    saved = torch.load(checkpoint.last_model_path, weights_only=True)["reml"]
    assert saved["converged"] and saved["history"] == module.history
    resumed = REMLModule(p.model, p.y, p.X, p.x_names, optimizer=optimizer)
    trainer(tmp_path, 200).fit(resumed, ckpt_path=checkpoint.last_model_path)
    assert resumed.converged and resumed.result.iterations == module.result.iterations
    assert resumed.result.params == pytest.approx(module.result.params, rel=1e-10)
