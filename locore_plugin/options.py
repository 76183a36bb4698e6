"""The one grammar of ``KEY=VALUE`` options on every command line (eval ``--option``, train
overrides, extract ``--option``).

A value is read, first match wins, as a TOML literal (``3``, ``1e-3``, ``true``, ``"text"``,
``[0.5, 0.3]``, ``{ depth = 2 }``), as a Python literal (``None``, ``True``, ``(0.5, 0.3)``,
``{'depth': 2}``), as JSON's ``null``, and otherwise kept as the text itself (a path, a name), so
that what a Python user types and what a recipe file holds both work.
"""
from __future__ import annotations

import ast
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SYNTAX = ("KEY=VALUE, VALUE a TOML or Python literal (3, 1e-3, true, None, \"text\", [0.5, 0.3], (0.5, 0.3), "
          "{ depth = 2 }) or plain text (a path, a name)")


def parse_value(text: str) -> Any:
    """The value of one option (see the module docstring)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return None if text.strip() == "null" else text


def parse_assignment(text: str, what: str = "an option") -> tuple[str, Any]:
    """``KEY=VALUE`` -> (KEY, value); anything else is a ValueError that shows the syntax."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{what} must look like {SYNTAX}; got {text!r}")
    return key.strip(), parse_value(value)
