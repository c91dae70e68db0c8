"""Terms written as text: a column, an interaction ``a:b``, or an arithmetic expression of
numeric columns (``sin(2 * pi * Time)``), as a model spec names them.

:func:`parse_term` checks the text against the data's columns and returns what
:func:`covmodules.design.fixed_design` and :func:`~covmodules.design.random_design` take: the
text itself for a column or an interaction, else ``(text, function of the DataFrame)``.
Expressions use numbers, ``+ - * / **``, ``pi`` and the functions in :data:`FUNCTIONS`.

>>> import pandas as pd
>>> parse_term("a:b", ["a", "b"])
'a:b'
>>> name, values = parse_term("2 * sqrt(t)", ["t"])
>>> values(pd.DataFrame({"t": [1.0, 4.0]})).tolist()
[2.0, 4.0]
"""

from __future__ import annotations

import ast
import operator

import numpy as np

__all__ = ["parse_term", "FUNCTIONS"]

FUNCTIONS = {"sin": np.sin, "cos": np.cos, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
             "abs": np.abs}
_CONSTANTS = {"pi": np.pi}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def parse_term(text: str, columns):
    """A column, an interaction ``a:b`` of ``columns``, or ``(text, function)`` for an
    expression; a ``ValueError`` says what is wrong with ``text``."""
    if text in columns or (":" in text and all(p in columns for p in text.split(":"))):
        return text
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"unknown column or malformed expression {text!r}; "
                         f"the data has columns {list(columns)}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in columns and node.id not in _CONSTANTS \
                and node.id not in FUNCTIONS:
            raise ValueError(f"unknown column {node.id!r} in term {text!r}; "
                             f"the data has columns {list(columns)}")
        if not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name,
                                 ast.Constant, ast.Load, *_BINARY, *_UNARY)):
            raise ValueError(f"unsupported syntax in term {text!r}: use columns, numbers, "
                             f"+ - * / **, pi and {sorted(FUNCTIONS)}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name)
                                               and node.func.id in FUNCTIONS):
            raise ValueError(f"unknown function in term {text!r}; use one of "
                             f"{sorted(FUNCTIONS)}")
    return text, lambda df, body=tree.body: np.asarray(_evaluate(body, df), dtype=np.float64)


def _evaluate(node, df):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _CONSTANTS[node.id] if node.id in _CONSTANTS else df[node.id].to_numpy(float)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, df), _evaluate(node.right, df))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, df))
    return FUNCTIONS[node.func.id](*[_evaluate(a, df) for a in node.args])
