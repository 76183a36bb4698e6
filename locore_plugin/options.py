"""The one grammar of ``KEY=VALUE`` options on every command line (eval ``--option``, train
overrides, extract ``--option``), and the one reader of recipe files (TOML or JSON) that the
training and evaluation recipes share.

A value is read, first match wins, as a TOML literal (``3``, ``1e-3``, ``true``, ``"text"``,
``[0.5, 0.3]``, ``{ depth = 2 }``), as a Python literal (``None``, ``True``, ``(0.5, 0.3)``,
``{'depth': 2}``), as JSON's ``null``, and otherwise kept as the text itself (a path, a name), so
that what a Python user types and what a recipe file holds both work.
"""
from __future__ import annotations

import ast
import json
import sys
import warnings
from pathlib import Path
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


def read_recipe_file(path, overrides=(), what: str = "recipe") -> dict:
    """The table of a ``.toml`` or ``.json`` recipe, with ``KEY=VALUE`` overrides applied; a key may
    be dotted (``data.list_length=50``) to reach into a table. Errors (missing file, another suffix, a
    syntax error, an override through a non-table) are ValueErrors / FileNotFoundErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"{what} must be .toml or .json, got {path}")
    try:
        values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} {path}: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a table, got {type(values).__name__}")
    for item in overrides:
        key, value = parse_assignment(item, "an override")
        *parents, leaf = key.split(".")
        table = values
        for parent in parents:
            table = table.setdefault(parent, {})
            if not isinstance(table, dict):
                raise ValueError(f"override {item!r}: {parent!r} is not a table")
        table[leaf] = value
    return values


class LocoreDeprecationWarning(FutureWarning):
    """An option name or file layout of locore-plugin 0.1, still accepted for one release. A
    ``FutureWarning``, so that users of the CLI and of notebooks see it (Python hides a plain
    ``DeprecationWarning`` raised inside a library); filter it by this class."""


def renamed_options(current: dict, deprecated: dict, renames: dict, owner: str) -> dict:
    """The options under today's names: ``current`` (the new names as given, None where not
    given) with the ``deprecated`` ones moved to their new names. ``renames`` maps an old name to
    its new name, or to a tuple of names it sets together (LoCoRE's ``num_locals`` sets
    ``query_length`` and ``gallery_length``). Each old name warns with a
    :class:`LocoreDeprecationWarning`; an option given under both names, or a name that is neither,
    is a TypeError (which one should win is not ours to guess)."""
    unknown = sorted(set(deprecated) - set(renames))
    if unknown:
        raise TypeError(f"{owner} got unexpected option(s) {unknown}")
    out = dict(current)
    for old, value in deprecated.items():
        targets = renames[old] if isinstance(renames[old], tuple) else (renames[old],)
        warnings.warn(f"{owner}: option {old!r} is deprecated and will be removed in the next release; "
                      f"use {' and '.join(repr(t) for t in targets)}", LocoreDeprecationWarning, stacklevel=3)
        both = [t for t in targets if current.get(t) is not None]
        if both:
            raise TypeError(f"{owner}: option(s) {both} given under both their new and their deprecated names")
        out.update(dict.fromkeys(targets, value))
    return out
