"""covmodules.specs: configs built into models; clear one-line errors naming the bad key."""

import numpy as np
import pandas as pd
import pytest
import torch

from covmodules import fit
from covmodules.specs import ModelSpec, SpecError

from oracle import DATA, load_oracle

FIELD = DATA.parent.parent / "data" / "sim_field_40x40.csv"
GRID = {"response": "y", "fixed": ["block"],
        "residual": {"structure": "ar1xar1_nugget", "row": "row", "col": "col"}}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_field(rows=8, cols=6, seed=0):
    df = pd.read_csv(FIELD)
    df = df[(df.row <= rows) & (df.col <= cols)]
    return df.sample(frac=1.0, random_state=seed)


def test_grid_rows_are_sorted_row_major_and_col_variance_fixed():
    problem = ModelSpec.from_dict(GRID).build(small_field())
    frame = problem.frame
    assert list(zip(frame.row, frame.col)) == [(r, c) for r in range(1, 9) for c in range(1, 7)]
    model = problem.model
    assert model.fixed_param_names == ["residual/field/col/sigma^2"]
    assert model.free_param_names == ["residual/field/row/sigma^2", "residual/field/row/rho",
                                      "residual/field/col/rho", "residual/nugget/sigma^2"]
    torch.testing.assert_close(problem.y, torch.tensor(frame.y.to_numpy()))


def test_incomplete_grid_is_a_clear_error():
    df = small_field().iloc[1:]
    with pytest.raises(SpecError, match=r"^residual: ar1xar1_nugget needs one row per cell .* "
                                        r"found 47 rows for 8 x 6 = 48 cells"):
        ModelSpec.from_dict(GRID).build(df)


def test_ovary_spec_reproduces_nlme():
    df, ref = load_oracle("g2")
    spec = ModelSpec.from_dict({"response": "follicles",
                                "fixed": ["sin(2 * pi * Time)", "cos(2 * pi * Time)"],
                                "random": {"Mare": {"group": "Mare"}},
                                "residual": {"structure": "ar1", "subject": "Mare"}})
    problem = spec.build(df)
    result = fit(problem.model, problem.y, problem.X, x_names=problem.x_names)
    assert abs(result.loglik - ref["logLik_REML"]) < 1e-6
    assert result.fixed_effects["estimate"].to_dict() == pytest.approx(ref["fixed_effects"],
                                                                      rel=1e-6)


def test_random_slopes_structures_and_names():
    df, _ = load_oracle("a")
    for structure, names in [("us", ["L[0,0]", "L[1,0]", "L[1,1]"]),
                             ("diag", ["sigma^2[0]", "sigma^2[1]"]),
                             ("cs", ["sigma^2", "rho"])]:
        spec = ModelSpec.from_dict({"response": "Reaction", "fixed": ["Days"], "random": {
            "Subject": {"group": "Subject", "terms": ["1", "Days"], "structure": structure}}})
        model = spec.build(df).model
        assert model.free_param_names == [f"Subject/terms/{n}" for n in names] + \
            ["residual/sigma^2"]


@pytest.mark.parametrize("structure, leaf", [("cs", "CompoundSymmetricMatrix"),
                                             ("us", "UnconstrainedMatrix"),
                                             ("diag", "DiagonalMatrix"),
                                             ("car1", "CAR1Matrix")])
def test_within_subject_residual_structures(structure, leaf):
    df, _ = load_oracle("a")
    spec = ModelSpec.from_dict({"response": "Reaction", "fixed": ["Days"],
                                "residual": {"structure": structure, "subject": "Subject",
                                             "time": "Days"}})
    model = spec.build(df).model
    within = model.residual.within
    assert type(within).__name__ == leaf and within.shape == (10, 10)
    V = model().detach()
    assert V[0, 10] == 0                               # rows 0 and 10: different subjects
    assert (V[0, 1] != 0) == (structure in ("cs", "car1"))


def test_independent_groups():
    df, _ = load_oracle("a")
    spec = ModelSpec.from_dict({"response": "Reaction", "fixed": ["Days"],
                                "random": {"Subject": {"group": "Subject"}}})
    codes, labels = spec.groups(spec.prepare(df))
    assert len(labels) == 18 and codes.shape == (180,)
    with pytest.raises(SpecError, match="^group: grouping \\['Subject'\\] is not nested in"):
        spec.groups(df, group="Days")
    grid = ModelSpec.from_dict(GRID)
    assert grid.groups(grid.prepare(small_field()))[1] == ["(all)"]


ERRORS = [
    ({"response": "y", "fixed": ["blok"]}, r"^fixed: unknown column 'blok' in term 'blok'"),
    ({"response": "y", "residual": "ar2"}, r"^residual.structure: unknown structure 'ar2'"),
    ({"response": "y", "residual": {"structure": "ar1", "rho": 0.5}},
     r"^residual.rho: unexpected key for structure 'ar1' \(it takes subject, time\)"),
    ({"response": "y", "residual": {"structure": "ar1xar1_nugget", "row": "row"}},
     r"^residual.col: structure 'ar1xar1_nugget' needs the col column"),
    ({"response": "y", "fix": {"residual/sigma": 1.0}},
     r"^fix.residual/sigma: unknown parameter; the model's parameters are \['residual/sigma\^2'"),
    ({"response": "y", "fix": {"residual/sigma^2": -1.0}}, r"^fix.residual/sigma\^2: value -1.0"),
    ({"response": "y", "random": {"g": {"group": "row", "structure": "ar2"}}},
     r"^random.g.structure: unknown structure 'ar2' for a random term"),
    ({"response": "y", "random": {"g": {"grouping": "row"}}}, r"^random.g.grouping: unexpected"),
    ({"response": "yy"}, r"^response: unknown column 'yy'"),
    ({"response": "y", "fixed": ["sin(row"]}, r"^fixed: unknown column or malformed expression"),
    ({"response": "y", "fixed": ["__import__('os')"]}, r"^fixed: unknown function in term"),
    ({"response": "y", "formla": "y ~ 1"}, r"^formla: unexpected key"),
]


@pytest.mark.parametrize("config, message", ERRORS)
def test_errors_name_the_key(config, message):
    with pytest.raises(SpecError, match=message) as info:
        ModelSpec.from_dict(config).build(small_field())
    assert "\n" not in str(info.value)


def test_expression_terms_evaluate_on_the_columns():
    df = small_field()
    problem = ModelSpec.from_dict({"response": "y", "fixed": ["sqrt(row) * cos(pi * col / 2)"]}
                                  ).build(df)
    expected = np.sqrt(df.row.to_numpy()) * np.cos(np.pi * df.col.to_numpy() / 2)
    np.testing.assert_allclose(problem.X[:, 1].numpy(), expected)
