"""Model formulas in R's syntax, compiled to a model spec (:mod:`covmodules.specs`).

:func:`compile_formula` splits ``"y ~ fixed + (terms | group) + ..."`` into the response, the
fixed part (a formula right-hand side that :mod:`covmodules.terms` builds with formulaic, R's
semantics) and the random terms, and an nlme-style ``correlation`` into the residual:

=================================  =========================================================
random term                        meaning
=================================  =========================================================
``(1 | g)``, ``(x | g)``           lme4: intercept (and slopes), unstructured ``G`` per level
``(x || g)``                       lme4: the same terms, independent (diagonal ``G``)
``(1 | a/b)``, ``(1 | a:b)``       nested (``(1 | b:a) + (1 | a)``), interaction grouping
``us(...)``, ``diag(...)``         glmmTMB: unstructured, heterogeneous diagonal
``cs(...)``, ``toep(...)``         glmmTMB: heterogeneous compound symmetry, Toeplitz
``ar1(0 + factor(t) | g)``         glmmTMB: AR(1) over the levels of ``t``, one variance
``rr(x | g, d = 2)``               glmmTMB: reduced rank ``Λ Λᵀ``, ``Λ`` of ``d`` columns
=================================  =========================================================

``correlation`` (residual within subject ``g``, in row order or at the levels / values of
``t``): ``"ar1(1 | g)"``, ``"ar1(t | g)"``, ``"car1(t | g)"``, ``"cs(1 | g)"``,
``"us(1 | g)"``, ``"diag(t | g)"``, and the separable spatial field with a nugget
``"ar1(row):ar1(col)"``. Unknown syntax raises a :class:`~covmodules.config.SpecError` that
quotes the offending term.

>>> spec = compile_formula("Reaction ~ Days + (Days | Subject)")
>>> spec["response"], spec["formula"], spec["random"]
('Reaction', 'Days', {'Subject': {'group': ['Subject'], 'formula': 'Days', 'structure': 'us'}})
>>> compile_formula("y ~ x", correlation="ar1(1 | g)")["residual"]
{'structure': 'ar1', 'subject': ['g']}
>>> compile_formula("y ~ x + foo(1 | g)")
Traceback (most recent call last):
...
covmodules.config.SpecError: formula: unknown covariance structure 'foo' in term 'foo(1 | g)'; \
use (terms | group) or one of ['us', 'diag', 'cs', 'toep', 'ar1', 'rr']
"""

from __future__ import annotations

import re

from .config import fail

__all__ = ["compile_formula", "split_top", "STRUCTURES"]

STRUCTURES = {"us": "us", "diag": "diag", "cs": "hcs", "toep": "toep", "ar1": "ar1", "rr": "rr"}
RESIDUALS = {"ar1": "ar1", "car1": "car1", "cs": "cs", "us": "us", "diag": "diag"}
_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")
_CALL = re.compile(r"^([A-Za-z_.][A-Za-z0-9_.]*)\s*\((.*)\)$", re.S)


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside parentheses and brackets (``sep`` one character)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([" and 1 or (ch in ")]" and -1 or 0)
        if depth < 0:
            fail(f"formula: unbalanced parentheses in {text!r}")
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        fail(f"formula: unbalanced parentheses in {text!r}")
    return parts + [text[start:]]


def compile_formula(formula: str, correlation: str | None = None, prefix: str = "") -> dict:
    """The spec dict (``response``, ``formula``, ``random``, ``residual``) of an R formula
    (``prefix``: put before the keys named in error messages)."""
    key = f"{prefix}formula"
    if not isinstance(formula, str) or formula.count("~") != 1:
        fail(f"{key}: expected a formula 'response ~ terms', got {formula!r}")
    lhs, rhs = (s.strip() for s in formula.split("~"))
    if not _NAME.match(lhs):
        fail(f"{key}: the response must be a column name, got {lhs!r}")
    fixed, random = [], {}
    for chunk in (c.strip() for c in split_top(rhs, "+")):
        if not chunk:
            fail(f"{key}: empty term in {rhs!r}")
        terms = _random_terms(chunk, key)
        if terms is None:
            fixed.append(chunk)
            continue
        for name, term in terms:
            base, i = name, 0
            while name in random:
                i += 1
                name = f"{base}_{i}"
            random[name] = term
    spec = {"response": lhs, "formula": " + ".join(fixed) or "1", "random": random}
    if correlation is not None:
        spec["residual"] = compile_correlation(correlation, f"{prefix}correlation")
    return spec


def _random_terms(chunk: str, key: str):
    """``[(name, random spec)]`` of a random-term chunk, ``None`` for a fixed term."""
    call = _CALL.match(chunk)
    if chunk.startswith("(") and chunk.endswith(")") and len(split_top(chunk[1:-1], "|")) > 1:
        structure, body = None, chunk[1:-1]
    elif call and len(split_top(call.group(2), "|")) > 1:
        structure, body = call.group(1), call.group(2)
        if structure not in STRUCTURES:
            fail(f"{key}: unknown covariance structure {structure!r} in term {chunk!r}; "
                 f"use (terms | group) or one of {list(STRUCTURES)}")
    elif "|" in chunk:
        fail(f"{key}: cannot read term {chunk!r}: a random term is (terms | group) or "
             f"structure(terms | group), e.g. (1 | g), ar1(0 + factor(t) | g)")
    else:
        return None
    args = [a.strip() for a in split_top(body, ",")]
    rank = None
    for extra in args[1:]:
        m = re.match(r"^d\s*=\s*(\d+)$", extra)
        if structure != "rr" or not m:
            fail(f"{key}: unexpected argument {extra!r} in term {chunk!r}"
                 + ("; rr takes d = <rank>" if structure == "rr" else ""))
        rank = int(m.group(1))
    if structure == "rr" and rank is None:
        rank = 2                                    # glmmTMB's default rank
    bars = split_top(args[0], "|")
    independent = len(bars) == 3 and not bars[1].strip()
    if len(bars) > 3 or (len(bars) == 3 and not independent) or (independent and structure):
        fail(f"{key}: cannot read term {chunk!r}: use one '|' (or '||' without a structure)")
    lhs, group = bars[0].strip(), bars[-1].strip()
    if not lhs or not group:
        fail(f"{key}: term {chunk!r} needs terms and a group on both sides of '|'")
    if structure is None:
        structure = "diag" if independent else "us"
    else:
        structure = STRUCTURES[structure]
    out = []
    for columns in _groupings(group, chunk, key):
        term = {"group": columns, "formula": lhs, "structure": structure}
        if rank is not None:
            term["rank"] = rank
        out.append((":".join(columns), term))
    return out


def _groupings(group: str, chunk: str, key: str) -> list[list[str]]:
    """The groupings of ``a``, ``a:b`` (one) or ``a/b/c`` (``c:b:a``, ``b:a``, ``a``: lme4)."""
    group = group.strip()
    if group.startswith("(") and group.endswith(")"):
        group = group[1:-1].strip()
    nested = [g.strip() for g in split_top(group, "/")]
    for part in nested:
        for col in part.split(":"):
            if not _NAME.match(col.strip()):
                fail(f"{key}: grouping {group!r} of term {chunk!r} must name columns "
                     "(g, a:b or a/b)")
    levels = [[c.strip() for c in part.split(":")] for part in nested]
    out = []
    for depth in range(len(levels), 0, -1):         # innermost first, as lme4 orders them
        out.append([c for part in reversed(levels[:depth]) for c in part])
    return out


def compile_correlation(text: str, key: str = "correlation") -> dict:
    """The residual spec of an nlme-style correlation string (see the module docstring)."""
    if not isinstance(text, str):
        fail(f"{key}: expected a string such as 'ar1(1 | g)', got {text!r}")
    parts = [p.strip() for p in split_top(text.strip(), ":")]
    if len(parts) == 2:
        axes = [_CALL.match(p) for p in parts]
        if all(a and a.group(1) == "ar1" and _NAME.match(a.group(2).strip()) for a in axes):
            return {"structure": "ar1xar1_nugget", "row": axes[0].group(2).strip(),
                    "col": axes[1].group(2).strip()}
        fail(f"{key}: a separable spatial field is 'ar1(row):ar1(col)', got {text!r}")
    call = _CALL.match(text.strip())
    if not call or call.group(1) not in RESIDUALS:
        fail(f"{key}: unknown correlation {text!r}; use one of "
             f"{[f'{s}(1 | g)' for s in RESIDUALS]} or 'ar1(row):ar1(col)'")
    body = call.group(2).strip().lstrip("~").strip()
    bars = split_top(body, "|")
    if len(bars) > 2:
        fail(f"{key}: cannot read {text!r}: use structure(time | group)")
    time = bars[0].strip()
    out = {"structure": RESIDUALS[call.group(1)]}
    if len(bars) == 2:
        out["subject"] = [c.strip() for c in bars[1].split(":")]
        if not all(_NAME.match(c) for c in out["subject"]):
            fail(f"{key}: the group of {text!r} must name columns (g or a:b)")
    if time != "1":
        if not _NAME.match(time):
            fail(f"{key}: the time of {text!r} must be 1 (row order) or a column name")
        out["time"] = time
    elif out["structure"] == "car1":
        fail(f"{key}: car1 needs a time column, e.g. 'car1(time | g)'")
    return out
