"""covmodules.design against the R reference designs and hand-built matrices."""

import numpy as np
import pandas as pd
import pytest
import torch

from covmodules.design import (drop_aliased, fixed_design, grouping, positions_within_group,
                               random_design)
from oracle import DATA, TRANSFORMS, fixed_terms, load_oracle, model_ids, random_terms

# Models whose GLS estimate equals OLS for every variance parameter (balanced designs: the
# column space of X is invariant under V), so R's fixed effects check X directly.
GLS_IS_OLS = ["a", "b", "c", "d", "f1", "f2"]

Z_SHAPES = {"a": [(180, 36)], "b": [(180, 18), (180, 18)], "c": [(30, 6)],
            "d": [(144, 24), (144, 6)], "f1": [(108, 27)], "f2": [], "g1": [],
            "g2": [(308, 11)]}


def hand_column(df: pd.DataFrame, recipe: dict) -> np.ndarray:
    """One X column from its reference.json recipe, without covmodules."""
    kind = recipe["kind"]
    if kind == "intercept":
        return np.ones(len(df))
    if kind == "numeric":
        return df[recipe["column"]].to_numpy(float)
    if kind == "dummy":
        return (df[recipe["column"]].astype(str) == recipe["level"]).to_numpy(float)
    return TRANSFORMS[kind](df[recipe["column"]].to_numpy(float))


def raw_csv(spec: dict) -> pd.DataFrame:
    """The CSV as pandas reads it by default (sleepstudy's Subject and Ovary's Mare are ints)."""
    return pd.read_csv(DATA / spec["data_file"].split("/")[-1])


def test_load_oracle():
    assert model_ids() == ["a", "b", "c", "d", "f1", "f2", "g1", "g2"]
    df, spec = load_oracle("f1")
    assert spec["id"] == "f1_orthodont_lmer_ri" and len(df) == spec["n"] == 108
    assert list(df["Sex"].cat.categories) == ["Male", "Female"] == spec["levels"]["Sex"]
    assert load_oracle("f1_orthodont_lmer_ri")[1]["id"] == spec["id"]
    df_a, _ = load_oracle("a")
    assert df_a["Subject"].iloc[0] == "308"
    with pytest.raises(ValueError, match="unknown reference model"):
        load_oracle("z")


@pytest.mark.parametrize("model_id", model_ids())
def test_oracle_X(model_id):
    df, spec = load_oracle(model_id)
    terms, intercept = fixed_terms(spec)
    design = fixed_design(df, terms, intercept=intercept, levels=spec["levels"])
    recipes = spec["X_columns"]
    assert design.names == [r["name"] for r in recipes]
    assert design.matrix.shape == (spec["n"], spec["p"])
    assert design.matrix.dtype == torch.float64
    hand = np.stack([hand_column(df, r) for r in recipes], axis=1)
    np.testing.assert_array_equal(design.matrix.numpy(), hand)
    for r in recipes:
        if r["kind"] == "dummy":
            assert design.levels[r["column"]][0] == r["reference_level"]
            assert design.levels[r["column"]] == spec["levels"][r["column"]]
    y = df[spec["response"]].to_numpy(float)
    beta = np.linalg.lstsq(design.matrix.numpy(), y, rcond=None)[0]
    np.testing.assert_allclose(beta, np.linalg.lstsq(hand, y, rcond=None)[0], rtol=1e-12)
    if model_id in GLS_IS_OLS:
        expected = [spec["fixed_effects"][name] for name in design.names]
        np.testing.assert_allclose(beta, expected, rtol=1e-9)
    # the raw CSV (factors as read, ints for sleepstudy/Ovary) with levels.json gives the same X
    raw = fixed_design(raw_csv(spec), terms, intercept=intercept, levels=spec["levels"])
    assert raw.names == design.names
    torch.testing.assert_close(raw.matrix, design.matrix, rtol=0, atol=0)


@pytest.mark.parametrize("model_id", model_ids())
def test_oracle_Z(model_id):
    df, spec = load_oracle(model_id)
    shapes = []
    for (group, terms), term_spec in zip(random_terms(spec), spec["random"]):
        rd = random_design(df, group, terms, levels=spec["levels"])
        shapes.append(tuple(rd.Z.shape))
        assert rd.levels == spec["levels"][group[0]]
        assert rd.terms == [t["name"] for t in term_spec["terms"]]
        assert rd.num_levels == len(rd.levels) and rd.num_terms == len(terms)
        assert rd.group == tuple(group)
        labels = df[group[0]].astype(str).to_numpy()
        np.testing.assert_array_equal(np.array(rd.levels)[rd.group_codes.numpy()], labels)
        hand = np.zeros(rd.Z.shape)
        for i in range(len(df)):
            for k, t in enumerate(term_spec["terms"]):
                value = 1.0 if t["kind"] == "intercept" else df[t["column"]].iloc[i]
                hand[i, rd.levels.index(labels[i]) * rd.num_terms + k] = value
        np.testing.assert_array_equal(rd.Z.numpy(), hand)
        torch.testing.assert_close(rd.Z_sparse.to_dense(), rd.Z, rtol=0, atol=0)
        if terms[0] == "1":
            ones = rd.Z[:, ::rd.num_terms]
            assert torch.equal(ones.sum(1), torch.ones(len(df), dtype=torch.float64))
            counts = df[group[0]].astype(str).value_counts()
            assert ones.sum(0).tolist() == [counts[lv] for lv in rd.levels]
    assert shapes == Z_SHAPES[model_id]


def test_sleepstudy_Z_is_subject_major():
    df, spec = load_oracle("a")
    rd = random_design(df, "Subject", ["1", "Days"], levels=spec["levels"])
    assert rd.terms == ["(Intercept)", "Days"]
    first = (df["Subject"] == "308").to_numpy()
    np.testing.assert_array_equal(rd.Z[:, 0].numpy(), first.astype(float))
    np.testing.assert_array_equal(rd.Z[:, 1].numpy(), np.where(first, df["Days"], 0.0))
    assert rd.Z[:, 2:].abs().sum(0).gt(0).all()
    assert torch.equal(rd.Z[:10, :2], rd.term_matrix[:10])
    assert rd.Z[:, 2:][:10].abs().sum() == 0


def test_sex_by_age_interaction_names_and_values():
    df, spec = load_oracle("f1")
    d = fixed_design(df, ["age", "Sex", "Sex:age"], levels=spec["levels"])
    assert d.names == ["(Intercept)", "age", "SexFemale", "SexFemale:age"]
    female = (df["Sex"] == "Female").to_numpy(float)
    np.testing.assert_array_equal(d.matrix[:, 3].numpy(), female * df["age"].to_numpy())
    # R's model.matrix rule: Sex gets contrasts when the term without Sex (age) is earlier ...
    d2 = fixed_design(df, ["age", "Sex:age"], levels=spec["levels"])
    assert d2.names == ["(Intercept)", "age", "SexFemale:age"]
    # ... and one indicator per level when it is not
    d3 = fixed_design(df, ["Sex:age"], levels=spec["levels"])
    assert d3.names == ["(Intercept)", "SexMale:age", "SexFemale:age"]


def test_factor_by_factor_interaction_first_part_varies_fastest():
    df = pd.DataFrame({"a": ["p", "q", "r", "p", "q", "r"], "b": ["x", "x", "x", "y", "y", "y"]})
    d = fixed_design(df, ["a", "b", "a:b"])
    assert d.names == ["(Intercept)", "aq", "ar", "by", "aq:by", "ar:by"]
    np.testing.assert_array_equal(d.matrix[:, 4].numpy(), [0, 0, 0, 0, 1, 0])
    full = fixed_design(df, ["a:b"], intercept=False)
    assert full.names == ["ap:bx", "aq:bx", "ar:bx", "ap:by", "aq:by", "ar:by"]
    np.testing.assert_array_equal(full.matrix.numpy(), np.eye(6))
    nested = fixed_design(df, ["a", "a:b"])
    assert nested.names == ["(Intercept)", "aq", "ar", "ap:by", "aq:by", "ar:by"]


def test_no_intercept_codes_first_factor_by_indicators():
    df, spec = load_oracle("f1")
    d = fixed_design(df, ["Sex", "age"], intercept=False, levels=spec["levels"])
    assert d.names == ["SexMale", "SexFemale", "age"]
    torch.testing.assert_close(d.matrix[:, :2].sum(1), torch.ones(108, dtype=torch.float64))
    dy, _ = load_oracle("d")
    two = fixed_design(dy, ["sample", "plate"], intercept=False)
    assert two.names[:7] == ["sampleA", "sampleB", "sampleC", "sampleD", "sampleE", "sampleF",
                             "plateb"]
    assert two.matrix.shape == (144, 6 + 23)


def test_numeric_interaction_and_callables():
    df = pd.DataFrame({"u": [1.0, 2.0, 3.0], "v": [4.0, 5.0, 6.0]})
    d = fixed_design(df, ["u", "u:v", ("exp(v)", lambda d: np.exp(d["v"]))])
    assert d.names == ["(Intercept)", "u", "u:v", "exp(v)"]
    np.testing.assert_allclose(d.matrix.numpy(),
                               np.stack([np.ones(3), df.u, df.u * df.v, np.exp(df.v)], axis=1))
    assert fixed_design(df, ("w", lambda d: torch.arange(3.0)), intercept=False).names == ["w"]
    assert fixed_design(df, [], intercept=False).matrix.shape == (3, 0)
    assert fixed_design(df, ["u"], dtype=torch.float32).matrix.dtype == torch.float32
    rd = random_design(df, "u", ["1", ("2v", lambda d: 2 * d.v)])
    assert rd.terms == ["(Intercept)", "2v"] and rd.Z.shape == (3, 6)
    assert rd.Z[2, 5] == 12.0


def test_ovary_sin_cos_columns():
    df, spec = load_oracle("g1")
    terms, _ = fixed_terms(spec)
    d = fixed_design(df, terms)
    np.testing.assert_allclose(d.matrix[:, 1].numpy(), np.sin(2 * np.pi * df.Time), rtol=0,
                               atol=0)
    np.testing.assert_allclose(d.matrix[:, 1] ** 2 + d.matrix[:, 2] ** 2, np.ones(308))


def test_level_order_sources():
    df = pd.DataFrame({"g": ["b", "c", "a", "b"], "n": [10, 9, 10, 100]})
    assert fixed_design(df, ["g"]).names == ["(Intercept)", "gb", "gc"]
    assert fixed_design(df, ["g"], levels={"g": ["c", "a", "b"]}).names == \
        ["(Intercept)", "ga", "gb"]
    cat = df.assign(g=pd.Categorical(df.g, categories=["z", "c", "b", "a"]))
    d = fixed_design(cat, ["g"])
    assert d.names == ["(Intercept)", "gb", "ga"] and d.levels == {"g": ["c", "b", "a"]}
    # a numeric column named in levels is a factor; default order of numbers is numeric
    assert grouping(df, "n")[1] == ["9", "10", "100"]
    assert fixed_design(df, ["n"], levels={"n": [100, 10, 9]}).names == \
        ["(Intercept)", "n10", "n9"]
    booleans = pd.DataFrame({"t": [True, False, True]})
    assert fixed_design(booleans, ["t"]).names == ["(Intercept)", "tTRUE"]
    # unused levels elsewhere in `levels` are ignored
    assert fixed_design(df, ["n"], levels={"other": ["x"]}).names == ["(Intercept)", "n"]


def test_grouping_interaction_and_list_levels():
    df, _ = load_oracle("d")
    codes, labels = grouping(df, ["plate", "sample"])
    assert len(labels) == 144 and labels[:3] == ["a:A", "a:B", "a:C"] and labels[6] == "b:A"
    np.testing.assert_array_equal(np.array(labels)[codes.numpy()],
                                  (df.plate.astype(str) + ":" + df["sample"].astype(str)))
    rd = random_design(df, ["plate", "sample"], levels={"plate": list("xwvutsrqponmlkjihgfedcba")})
    assert rd.levels[0] == "x:A" and rd.Z.shape == (144, 144)
    small = pd.DataFrame({"g": ["a", "b", "a"]})
    codes, labels = grouping(small, "g", ["b", "a"])
    assert labels == ["b", "a"] and codes.tolist() == [1, 0, 1]
    pairs = small.assign(h=[1, 1, 2])
    codes, labels = grouping(pairs, ["g", "h"], ["b:1", "a:2", "a:1"])
    assert labels == ["b:1", "a:2", "a:1"] and codes.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="not in levels"):
        grouping(small, "g", ["a"])


def test_positions_within_group():
    df, spec = load_oracle("g1")
    codes, _ = grouping(df, "Mare", spec["levels"])
    pos = positions_within_group(codes)
    np.testing.assert_array_equal(pos.numpy(), df.groupby("Mare", observed=True).cumcount())
    assert positions_within_group(torch.tensor([], dtype=torch.long)).numel() == 0
    assert positions_within_group(np.array([2, 2, 0])).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="non-negative"):
        positions_within_group(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="1-D integer"):
        positions_within_group(torch.tensor([0.0, 1.0]))


def test_errors():
    df = pd.DataFrame({"x": [1.0, np.nan, 3.0], "s": ["a", "b", "a"], "y": [1.0, 2.0, 3.0],
                       "t": pd.to_datetime(["2020-01-01"] * 3)})
    with pytest.raises(ValueError, match=r"unknown column 'z'.*'x', 's', 'y'"):
        fixed_design(df, ["z"])
    with pytest.raises(ValueError, match=r"unknown column 'z'"):
        fixed_design(df, ["y:z"])
    with pytest.raises(ValueError, match=r"column 'x' has 1 missing"):
        fixed_design(df, ["x"])
    with pytest.raises(ValueError, match=r"column 'x' has 1 missing"):
        random_design(df, "s", ["1", "x"])
    with pytest.raises(ValueError, match=r"column 'f' has 1 missing"):
        fixed_design(df, [("f", lambda d: d.x)])
    with pytest.raises(ValueError, match="unknown level.*'c'"):
        fixed_design(df, ["s"], levels={"s": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"values not in levels\['s'\]: \['b'\]"):
        fixed_design(df, ["s"], levels={"s": ["a"]})
    with pytest.raises(ValueError, match="duplicate levels"):
        fixed_design(df, ["s"], levels={"s": ["a", "b", "a"]})
    with pytest.raises(TypeError, match="'s' must be numeric"):
        random_design(df, "y", ["s"])
    with pytest.raises(TypeError, match="'y' must be numeric"):
        random_design(df, "s", ["y"], levels={"y": [1.0, 2.0, 3.0]})
    with pytest.raises(TypeError, match="'t' must be numeric"):
        fixed_design(df, ["t"])
    with pytest.raises(TypeError, match="'f' must be numeric"):
        fixed_design(df, [("f", lambda d: d.s)])
    with pytest.raises(ValueError, match="'f' has 2 values, expected 3"):
        fixed_design(df, [("f", lambda d: [1.0, 2.0])])
    with pytest.raises(ValueError, match="'inf' has 1 missing or infinite"):
        fixed_design(df, [("inf", lambda d: d.y / (d.y - 1))])
    with pytest.raises(ValueError, match="duplicate terms"):
        fixed_design(df, ["y", "s", "s"])
    with pytest.raises(ValueError, match="duplicate terms"):
        fixed_design(df, ["y:s", "s:y"])
    with pytest.raises(ValueError, match="malformed term"):
        fixed_design(df, ["y:"])
    with pytest.raises(TypeError, match="column spec"):
        fixed_design(df, [3])
    with pytest.raises(TypeError, match=r"\(name, function\) pair"):
        fixed_design(df, [("f", "y")])
    with pytest.raises(TypeError, match="floating-point"):
        fixed_design(df, ["y"], dtype=torch.int64)
    with pytest.raises(ValueError, match="no rows"):
        fixed_design(df.iloc[:0], ["y"])
    with pytest.raises(ValueError, match="duplicate random-effect terms"):
        random_design(df, "s", ["1", "1"])
    with pytest.raises(ValueError, match="at least one term"):
        random_design(df, "s", [])
    with pytest.raises(ValueError, match="unknown column 'g'"):
        random_design(df, "g")
    with pytest.raises(ValueError, match="at least one column"):
        grouping(df, [])


def test_drop_aliased_exact_and_scaled():
    df, _ = load_oracle("d")
    d = fixed_design(df, ["sample"], intercept=False)
    X = torch.cat([torch.ones(144, 1, dtype=torch.float64), d.matrix], dim=1)
    names = ["(Intercept)"] + d.names
    Xr, kept, dropped = drop_aliased(X, names)
    assert kept == names[:-1] and dropped == ["sampleF"]
    assert torch.equal(Xr, X[:, :-1])
    scaled = X * torch.tensor([1e-6] + [1e6] * 6, dtype=torch.float64)
    assert drop_aliased(scaled, names)[2] == ["sampleF"]


def test_drop_aliased_tolerance_and_rank():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 4, generator=g, dtype=torch.float64)
    combo = A[:, :2] @ torch.tensor([2.0, -3.0], dtype=torch.float64)
    zero = torch.zeros(50, dtype=torch.float64)
    X = torch.stack([A[:, 0], A[:, 1], combo, zero, A[:, 2], combo + 1e-9 * A[:, 3],
                     combo + 1e-4 * A[:, 3]], dim=1)
    names = list("abcdefg")
    Xr, kept, dropped = drop_aliased(X, names)
    assert kept == ["a", "b", "e", "g"] and dropped == ["c", "d", "f"]
    assert np.linalg.matrix_rank(Xr.numpy()) == Xr.shape[1] == 4
    assert drop_aliased(X, names, tol=1e-3)[1] == ["a", "b", "e"]   # g: residual 3e-5 of its norm
    with pytest.raises(ValueError, match=r"tol must lie in \[6e-08, 1\)"):
        drop_aliased(X, names, tol=1e-12)      # below what XᵀX resolves
    assert drop_aliased(A, list("wxyz"))[2] == []
    assert drop_aliased(X.float(), names)[0].dtype == torch.float32
    with pytest.raises(ValueError, match="names for"):
        drop_aliased(X, names[:3])
    with pytest.raises(ValueError, match="2-D"):
        drop_aliased(X[:, 0], ["a"])
