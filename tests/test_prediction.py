"""FitResult.predict against lme4's predict.merMod (tests/data/predict_reference.json, from
scripts/r_reference_predict.R): existing and new levels, with and without random effects."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covmodules import lmm
from covmodules.specs import ModelSpec

from oracle import load_oracle

DATA = Path(__file__).parent / "data"
CASES = {c["id"]: c for c in json.loads((DATA / "predict_reference.json").read_text())["cases"]}
DATASETS = {"sleepstudy": "a", "orthodont": "f1", "orthodont_poly": "f1"}


def _fit(case_id):
    case = CASES[case_id]
    formula = case["call"][len("lmer("):case["call"].rindex(",")]
    return lmm(formula, load_oracle(DATASETS[case_id])[0]), case


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_predict_matches_lme4(case_id):
    result, case = _fit(case_id)
    new = pd.DataFrame(case["newdata"])
    np.testing.assert_allclose(result.predict(new), case["conditional"], rtol=1e-6)
    np.testing.assert_allclose(result.predict(new, include_random=False), case["population"],
                               rtol=1e-7)
    np.testing.assert_allclose(result.predict(), case["fitted"], rtol=1e-6)


def test_predict_is_row_by_row_and_needs_no_response():
    result, case = _fit("orthodont")
    new = pd.DataFrame(case["newdata"])
    assert "distance" not in new
    whole = result.predict(new)
    parts = [result.predict(new.iloc[[i]]) for i in range(len(new))[::-1]]
    np.testing.assert_allclose(np.concatenate(parts[::-1]), whole, rtol=1e-12)
    train = load_oracle("f1")[0].drop(columns="distance")
    np.testing.assert_allclose(result.predict(train), result.fitted(), rtol=1e-10)


def test_new_levels():
    result, case = _fit("sleepstudy")
    new = pd.DataFrame(case["newdata"])
    with pytest.raises(ValueError, match=r"random term 'Subject': level\(s\) \['999'\] of "
                                         r"Subject not in the fitted data"):
        result.predict(new, allow_new_levels=False)
    known = new[new.Subject != "999"]
    assert result.predict(known, allow_new_levels=False) == pytest.approx(
        result.predict(known))
    ortho = lmm("distance ~ age * Sex + (age | Subject)", load_oracle("f1")[0])
    with pytest.raises(ValueError, match=r"Sex: level\(s\) \['Other'\] not seen"):
        ortho.predict(pd.DataFrame({"age": [9.0], "Sex": ["Other"], "Subject": ["M01"]}))
    with pytest.raises(ValueError, match="for the new data: .*`age` is not present"):
        ortho.predict(pd.DataFrame({"Sex": ["Male"], "Subject": ["M01"]}))


def test_column_spec_fits_predict_too():
    """A fit from a column spec (the YAML ``fixed:`` / ``random:`` keys) predicts as the formula."""
    df = load_oracle("f1")[0]
    spec = ModelSpec.from_dict({"response": "distance", "fixed": ["age", "Sex", "Sex:age"],
                                "random": {"Subject": {"group": "Subject",
                                                       "terms": ["1", "age"]}},
                                "levels": {"Sex": ["Male", "Female"]}})
    from covmodules import fit
    from covmodules.prediction import Source
    frame = spec.prepare(df)
    p = spec.problem(frame)
    result = fit(p.model, p.y, p.X, x_names=p.x_names)
    result.source = Source(spec, frame)
    case = CASES["orthodont"]
    new = pd.DataFrame(case["newdata"])
    np.testing.assert_allclose(result.predict(new), case["conditional"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"Sex: level\(s\) \['Other'\]"):
        result.predict(new.assign(Sex="Other"))
