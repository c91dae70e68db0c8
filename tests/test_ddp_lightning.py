"""Lightning DDP: 2 gloo processes, each with an uneven share of whole groups in several batches,
fit exactly what one process fits (AI-REML, LBFGS, Adam) and resume from a checkpoint; batches
in one process predict exactly; shards keep the whole data's structure."""

import os
import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from covmodules import fit
from covmodules.specs import ModelSpec, SpecError
from training import MixedModelDataModule, REMLModule
from training.data import GroupSampler
from gloo import free_port

SPEC = {"response": "y", "fixed": ["t"], "random": {"subject": {"group": "subject"}},
        "residual": {"structure": "ar1", "subject": "subject"}}
EPOCHS = {"ai": 50, "lbfgs": 50, "adam": 40}     # adam stops at 40 steps, unconverged


pytestmark = pytest.mark.usefixtures("one_thread")


def write_data(path, num_subjects=21, seed=0):
    """Random intercept + AR(1) within subject, 3 to 8 observations per subject."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(num_subjects):
        size, u, e = int(rng.integers(3, 9)), rng.normal(0, 2), 0.0
        for t in range(size):
            e = 0.5 * e + rng.normal()
            rows.append((f"s{s:02d}", t, 10 + 0.5 * t + u + e))
    pd.DataFrame(rows, columns=["subject", "t", "y"]).to_csv(path, index=False)
    return str(path)


class FirstGradient(Callback):
    """The covariance parameters' gradient at the first optimiser step (after DDP's averaging)."""

    grad = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grad is None:
            self.grad = torch.stack([p.grad for p in pl_module.covariance.parameters()])


def lightning_fit(path, optimizer, devices=1, groups_per_batch=None, max_epochs=None,
                  checkpoints=None, ckpt_path=None):
    dm = MixedModelDataModule(path, **SPEC, val_fraction=0.2, groups_per_batch=groups_per_batch)
    module, first = REMLModule(optimizer=optimizer), FirstGradient()
    callbacks = [first] if checkpoints is None else [
        first, ModelCheckpoint(dirpath=checkpoints, monitor="loglik", mode="max", save_last=True)]
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto",
                        max_epochs=max_epochs or EPOCHS[optimizer], logger=False,
                        enable_checkpointing=checkpoints is not None, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # adam stops unconverged on purpose
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    result = module.result
    return {"free": result.free, "loglik": result.loglik, "iterations": result.iterations,
            "grad": first.grad, "batches": len(dm.train_batches),
            "groups": sum(b.problem.frame.subject.nunique() for b in dm.train_batches),
            "val": {k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith("val/")}}


def _worker(rank, world, port, path, out):
    # what torchrun sets: Lightning then joins these processes instead of launching its own
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    results = {name: lightning_fit(path, name, devices=world, groups_per_batch=3)
               for name in EPOCHS}
    # stop AI-REML after 2 steps, resume every process from rank 0's checkpoint
    checkpoints = f"{out}.checkpoints"
    lightning_fit(path, "ai", world, 3, max_epochs=2, checkpoints=checkpoints)
    results["resumed"] = lightning_fit(path, "ai", world, 3, checkpoints=checkpoints,
                                       ckpt_path=f"{checkpoints}/last.ckpt")
    torch.save(results, f"{out}.{rank}")


def test_two_ddp_processes_equal_the_single_process_fit(tmp_path):
    path = write_data(tmp_path / "data.csv")
    out = str(tmp_path / "results")
    mp.spawn(_worker, args=(2, free_port(), path, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    # 21 subjects, 4 held out: 8 and 9 training subjects, in batches of 3
    assert [r["ai"]["groups"] for r in ranks] == [8, 9]
    assert [r["ai"]["batches"] for r in ranks] == [3, 3]
    for r in ranks:
        assert r["resumed"]["iterations"] == r["ai"]["iterations"]
        assert r["resumed"]["loglik"] == pytest.approx(r["ai"]["loglik"], rel=1e-12)
    for name, epochs in EPOCHS.items():
        single = lightning_fit(path, name)
        dm = MixedModelDataModule(path, **SPEC, val_fraction=0.2)
        dm.setup("fit")
        p = dm.train_problem
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = fit(p.model, p.y, p.X, optimizer=name, max_iter=epochs)
        assert single["loglik"] == pytest.approx(plain.loglik, rel=1e-8)
        for got in (r[name] for r in ranks):
            print(f"{name}: {got['iterations']} iterations, logLik {got['loglik']:.10f} "
                  f"(one process {single['loglik']:.10f})")
            assert got["iterations"] == single["iterations"]
            assert got["loglik"] == pytest.approx(single["loglik"], rel=1e-8)
            torch.testing.assert_close(got["free"], single["free"], rtol=1e-8, atol=1e-10)
            assert got["val"] == pytest.approx(single["val"], rel=1e-8)
            assert set(got["val"]) == {"val/mse", "val/r2", "val/loglik"}
            if name != "ai":          # DDP averaged world_size x each process's share
                torch.testing.assert_close(got["grad"], single["grad"], rtol=1e-8, atol=1e-12)


def test_batches_in_one_process_fit_and_predict_exactly(tmp_path):
    path = write_data(tmp_path / "data.csv", seed=1)
    fitted = {}
    for groups_per_batch in (None, 4):
        dm = MixedModelDataModule(path, **SPEC, val_fraction=0.2,
                                  groups_per_batch=groups_per_batch)
        module = REMLModule(optimizer="lbfgs")
        trainer = L.Trainer(accelerator="cpu", max_epochs=50, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, datamodule=dm)
        frames = trainer.predict(module, datamodule=dm)
        fitted[groups_per_batch] = (module, pd.concat(frames).sort_index(), module.blup_table())
    (whole, whole_rows, whole_blups), (batched, rows, blups) = fitted[None], fitted[4]
    assert not whole.sharded and batched.sharded and len(batched._shards) == 5
    assert batched.result.loglik == pytest.approx(whole.result.loglik, rel=1e-10)
    assert list(rows.index) == list(whole_rows.index)
    for column in ("fitted_marginal", "fitted", "residual"):
        np.testing.assert_allclose(rows[column], whole_rows[column], rtol=1e-8)
    key = ["term", "level", "coefficient"]
    blups, whole_blups = blups.sort_values(key), whole_blups.sort_values(key)
    assert blups[key].values.tolist() == whole_blups[key].values.tolist()
    np.testing.assert_allclose(blups.blup, whole_blups.blup, rtol=1e-8, atol=1e-10)


def test_group_sampler_splits_whole_groups_once_and_evenly():
    for num_groups in range(8):
        for world in range(1, 5):
            shares = [list(GroupSampler(num_groups, world, rank)) for rank in range(world)]
            assert sum(shares, []) == list(range(num_groups))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_every_process_needs_a_group(tmp_path):
    path = write_data(tmp_path / "data.csv", num_subjects=5)
    dm = MixedModelDataModule(path, **SPEC)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=8)
    with pytest.raises(SpecError, match="5 training group.* for 8 processes"):
        dm.setup("fit")


def test_a_subset_of_rows_keeps_the_whole_data_time_axis():
    # subject b lacks time 2: alone, its times would be 0, 1, 2 instead of 0, 1, 3
    df = pd.DataFrame({"subject": list("aaaabbb"), "time": [0, 1, 2, 3, 0, 1, 3],
                       "y": [1.0, 2, 0, 1, 3, 2, 2]})
    spec = ModelSpec.from_dict({"response": "y", "random": {"s": {"group": "subject"}},
                                "residual": {"structure": "us", "subject": "subject",
                                             "time": "time"}})
    frame = spec.prepare(df)
    whole, part = spec.problem(frame), spec.problem(frame, rows=[4, 5, 6])
    assert part.model.free_param_names == whole.model.free_param_names
    free = 0.2 * torch.randn(whole.model.num_free_params, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    torch.testing.assert_close(part.model(free), whole.model(free)[4:, 4:])


CROSSED = {"response": "y", "fixed": ["x"],
           "random": {"a": {"group": "a"}, "b": {"group": "b", "terms": ["1", "x"]}}}


def write_crossed(path, n=240, seed=3):
    """Two crossed factors (13 and 6 levels, one with a random slope): the rows form one block."""
    rng = np.random.default_rng(seed)
    a, b, x = rng.integers(0, 13, n), rng.integers(0, 6, n), rng.normal(size=n)
    ua, ub, sb = rng.normal(0, 1.5, 13), rng.normal(0, 1.0, 6), rng.normal(0, 0.5, 6)
    y = 1 + 0.5 * x + ua[a] + ub[b] + sb[b] * x + rng.normal(size=n)
    pd.DataFrame({"a": [f"a{i}" for i in a], "b": [f"b{i}" for i in b], "x": x, "y": y}
                 ).to_csv(path, index=False)
    return str(path)


def crossed_fit(path, optimizer, devices):
    dm = MixedModelDataModule(path, **CROSSED)
    module = REMLModule(optimizer=optimizer)
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", max_epochs=EPOCHS[optimizer],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return {"free": module.result.free, "loglik": module.result.loglik,
            "iterations": module.result.iterations, "rows": len(dm.train_batches[0]),
            "objective": type(module.objective).__name__, "blups": module.blup_table()}


def _crossed_worker(rank, world, port, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    torch.save({name: crossed_fit(path, name, world) for name in ("ai", "lbfgs")},
               f"{out}.{rank}")


def test_two_ddp_processes_split_the_rows_of_crossed_terms_exactly(tmp_path):
    path = write_crossed(tmp_path / "crossed.csv")
    out = str(tmp_path / "crossed")
    mp.spawn(_crossed_worker, args=(2, free_port(), path, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    assert [r["ai"]["rows"] for r in ranks] == [120, 120]
    for name in ("ai", "lbfgs"):
        single = crossed_fit(path, name, 1)
        assert single["objective"] == "REML"
        key = ["term", "level", "coefficient"]
        for got in (r[name] for r in ranks):
            assert got["objective"] == "CrossedREML"
            assert got["loglik"] == pytest.approx(single["loglik"], rel=1e-10)
            torch.testing.assert_close(got["free"], single["free"], rtol=1e-8, atol=1e-8)
            ours, ref = got["blups"].sort_values(key), single["blups"].sort_values(key)
            assert ours[key].values.tolist() == ref[key].values.tolist()
            np.testing.assert_allclose(ours.blup, ref.blup, rtol=1e-8, atol=1e-10)
