"""Config values: :class:`SpecError` and the checks that read a key's value.

Every mistake in a spec (:mod:`covmodules.specs`) raises a :class:`SpecError` whose one-line
message starts with the key it is about (``residual.structure: ...``); the command line prints
it as ``error: <message>``.

>>> names(["Mare", "Time"], "fixed")
('Mare', 'Time')
>>> mapping(3, "random")
Traceback (most recent call last):
...
covmodules.config.SpecError: random: expected a mapping, got 3
"""

from __future__ import annotations

from typing import Mapping, NoReturn

__all__ = ["SpecError", "fail", "names", "mapping"]


class SpecError(ValueError):
    """A spec, or the data it is applied to, is malformed; the message names the key."""


def fail(message: str) -> NoReturn:
    raise SpecError(message)


def names(value, key: str) -> tuple[str, ...]:
    """A column name or a list of them, as a tuple."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        fail(f"{key}: expected a column name or a list of them, got {value!r}")
    return tuple(value)


def mapping(value, key: str) -> dict:
    """A mapping (``None``: empty), as a dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        fail(f"{key}: expected a mapping, got {value!r}")
    return dict(value)
