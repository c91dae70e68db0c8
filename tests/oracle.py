"""R reference fits shipped in tests/data (see tests/data/README.md) and their designs."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

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
