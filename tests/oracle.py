"""R reference fits shipped in tests/data (see tests/data/README.md), their designs and models."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covmodules import (AR1Matrix, CompoundSymmetricMatrix, Grouped, IdentityMatrix,
                        KroneckerProduct, MixedModel, ScalarMatrix, UnconstrainedMatrix)
from covmodules.design import fixed_design, random_design

DATA = Path(__file__).parent / "data"
TRANSFORMS = {"sin2pi": lambda x: np.sin(2 * np.pi * x),
              "cos2pi": lambda x: np.cos(2 * np.pi * x)}


@functools.lru_cache(maxsize=None)
def _json(name: str):
    return json.loads((DATA / name).read_text())


def model_ids() -> list[str]:
    """Short ids of the reference models: 'a', 'b', 'c', 'd', 'f1', 'f2', 'g1', 'g2'."""
    return [m["id"].split("_")[0] for m in _json("reference.json")["models"]]


def load_oracle(model_id: str) -> tuple[pd.DataFrame, dict]:
    """(data, spec) of a reference model, by short id ('f1') or full id.

    Factor columns are pandas Categoricals with R's level order (unordered); ``spec`` is the
    model's entry of reference.json plus ``spec["levels"]``: {factor column: R level order}.
    """
    models = _json("reference.json")["models"]
    found = [m for m in models if model_id in (m["id"], m["id"].split("_")[0])]
    if not found:
        raise ValueError(f"unknown reference model {model_id!r}; known: {model_ids()}")
    spec = copy.deepcopy(found[0])
    factors = _json("levels.json")[spec["dataset"]]["factors"]
    spec["levels"] = {col: list(f["levels"]) for col, f in factors.items()}
    df = pd.read_csv(DATA / Path(spec["data_file"]).name, dtype={c: str for c in factors})
    for col, order in spec["levels"].items():
        df[col] = pd.Categorical(df[col], categories=order)
    return df, spec


def _term(recipe: dict):
    if recipe["kind"] in ("numeric", "dummy"):
        return recipe["column"]
    f = TRANSFORMS[recipe["kind"]]
    return recipe["name"], lambda d, col=recipe["column"]: f(d[col])


def fixed_terms(spec: dict) -> tuple[list, bool]:
    """(terms, intercept) for covmodules.design.fixed_design from spec["X_columns"]."""
    recipes = spec["X_columns"]
    intercept = any(r["kind"] == "intercept" for r in recipes)
    terms = []
    for r in recipes:
        if r["kind"] == "intercept" or (r["kind"] == "dummy" and r["column"] in terms):
            continue
        terms.append(_term(r))
    return terms, intercept


def random_terms(spec: dict) -> list[tuple[list[str], list]]:
    """[(grouping columns, terms)] for covmodules.design.random_design, one per random term."""
    return [(list(r["grouping"]), ["1" if t["kind"] == "intercept" else _term(t)
                                   for t in r["terms"]])
            for r in spec["random"]]


def build(model_id: str):
    """``(model, y, X, x_names, spec)`` of a reference model, its structures as lme4's /
    nlme's (``spec``: :func:`load_oracle`'s)."""
    df, spec = load_oracle(model_id)
    terms, intercept = fixed_terms(spec)
    design = fixed_design(df, terms, intercept=intercept, levels=spec["levels"])
    y = torch.tensor(df[spec["response"]].to_numpy(), dtype=torch.float64)
    n = len(df)
    random = {}
    for (group, term_list), ref in zip(random_terms(spec), spec["random"]):
        rd = random_design(df, group, term_list, levels=spec["levels"].get(group[0]))
        k = rd.num_terms
        G = (KroneckerProduct(levels=IdentityMatrix(rd.num_levels), terms=UnconstrainedMatrix(k))
             if k > 1 else ScalarMatrix(rd.num_levels))
        random[term_name(ref)] = (rd, G)
    res = spec["residual"]
    if res["type"] == "iid":
        residual = ScalarMatrix(n)
    else:
        groups = df[res["group"][0]].to_numpy()
        size = int(df.groupby(res["group"][0], observed=True).size().max())
        leaf = AR1Matrix(size) if res["type"] == "ar1" else CompoundSymmetricMatrix(size)
        residual = Grouped(within=leaf, groups=groups)
    model = MixedModel(random=random, residual=residual)
    return model, y, design.matrix, design.names, spec


def term_name(ref: dict) -> str:
    """The model's name of a reference random term."""
    return ref["label"].replace(".", "_")    # lme4's "Subject.1": '.' is not allowed in names
