"""One declared schema per file we read — policy and scenario TOML, ``frontier.json``,
``engine.json`` — instead of ad-hoc ``get``s: types, ranges (with units), required and optional
keys, declared once next to the code that uses the file.

``check(data, schema, source)`` returns the data with defaults filled in, or raises a
``ValueError`` that names the file, the key's path, the value, what is allowed and, for an
unknown (misspelt) key, the closest known one. Numbers must be finite: NaN and infinity are never
a setting.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

MISSING = object()


@dataclass(frozen=True)
class Number:
    low: float = -math.inf
    high: float = math.inf
    unit: str = ""
    integer: bool = False
    low_open: bool = False  # the value must be above ``low``, not equal to it
    default: Any = MISSING  # MISSING: required
    nullable: bool = False

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a number"
        unit = f" {self.unit}" if self.unit else ""
        low = "-inf" if self.low == -math.inf else f"{self.low:g}"
        high = "inf" if self.high == math.inf else f"{self.high:g}"
        return f"{kind} in {'(' if self.low_open else '['}{low}, {high}]{unit}"


@dataclass(frozen=True)
class Text:
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # a regular expression the whole text must match
    example: str = ""
    default: Any = MISSING
    nullable: bool = False

    def allowed(self) -> str:
        if self.choices:
            return f"one of {', '.join(map(repr, self.choices))}"
        return "a string" + (f" like {self.example!r}" if self.example else "")


@dataclass(frozen=True)
class Flag:
    default: Any = MISSING
    nullable: bool = False

    def allowed(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class ListOf:
    item: Any
    min_len: int = 0
    max_len: int = 100_000
    default: Any = MISSING
    nullable: bool = False

    def allowed(self) -> str:
        return f"a list of {self.min_len} to {self.max_len} items, each {self.item.allowed()}"


@dataclass(frozen=True)
class Pair:
    """A fixed-length list of different things, e.g. ``[time_s, value]``."""
    items: tuple
    names: tuple[str, ...]
    default: Any = MISSING
    nullable: bool = False

    def allowed(self) -> str:
        return "[" + ", ".join(self.names) + "]"


@dataclass(frozen=True)
class Table:
    """A table (TOML) or object (JSON) with known keys; unknown keys are errors unless ``open``."""
    fields: dict = field(default_factory=dict)
    open: bool = False
    default: Any = MISSING
    nullable: bool = False

    def allowed(self) -> str:
        return f"a table with keys {', '.join(self.fields) or '(any)'}"


@dataclass(frozen=True)
class MapOf:
    """A table whose keys are data (phase names, input names), each value ``value``."""
    value: Any
    min_len: int = 0
    default: Any = MISSING
    nullable: bool = False

    def allowed(self) -> str:
        return f"a table of at least {self.min_len} entries, each {self.value.allowed()}"


def optional(spec, default=None):
    """``spec`` with a default (None: may be left out, and may be null)."""
    return replace(spec, default=default, nullable=spec.nullable or default is None)


def show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def closest(key: str, known) -> str:
    match = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
    return f"did you mean {match[0]!r}? " if match else ""


def check(value, spec, source: str, path: str = ""):
    """``value`` checked against ``spec`` (``path`` names it in messages); returns it with defaults."""
    where = f"{source}: {path or 'the file'}"
    if value is None:
        if spec.nullable:
            return None
        raise ValueError(f"{where} is null; it must be {spec.allowed()}")
    if isinstance(spec, Number):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                spec.integer and not isinstance(value, int)):
            raise ValueError(f"{where} = {show(value)} must be {spec.allowed()}")
        if not math.isfinite(value) or value < spec.low or value > spec.high or (spec.low_open and value == spec.low):
            raise ValueError(f"{where} = {show(value)} must be {spec.allowed()}")
        return value
    if isinstance(spec, Text):
        if not isinstance(value, str) or (spec.choices and value not in spec.choices) or (
                spec.pattern and not re.fullmatch(spec.pattern, value)):
            raise ValueError(f"{where} = {show(value)} must be {spec.allowed()}")
        return value
    if isinstance(spec, Flag):
        if not isinstance(value, bool):
            raise ValueError(f"{where} = {show(value)} must be {spec.allowed()}")
        return value
    if isinstance(spec, ListOf):
        if not isinstance(value, list) or not spec.min_len <= len(value) <= spec.max_len:
            raise ValueError(f"{where} = {show(value)} must be {spec.allowed()}")
        return [check(item, spec.item, source, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(spec, Pair):
        if not isinstance(value, list) or len(value) != len(spec.items):
            raise ValueError(f"{where} = {show(value)} must be {spec.allowed()}")
        return [check(item, item_spec, source, f"{path}[{i}] ({name})")
                for i, (item, item_spec, name) in enumerate(zip(value, spec.items, spec.names))]
    if isinstance(spec, MapOf):
        if not isinstance(value, dict) or len(value) < spec.min_len:
            raise ValueError(f"{where} = {show(value)} must be {spec.allowed()}")
        return {key: check(item, spec.value, source, f"{path}.{key}" if path else str(key))
                for key, item in value.items()}
    if isinstance(spec, Table):
        if not isinstance(value, dict):
            raise ValueError(f"{where} = {show(value)} must be {spec.allowed()}")
        if not spec.open:
            for key in value:
                if key not in spec.fields:
                    name = f"{path}.{key}" if path else str(key)
                    raise ValueError(f"{source}: unknown key {name!r}; {closest(key, spec.fields)}known keys"
                                     f"{' of ' + path if path else ''}: {', '.join(spec.fields)}")
        result = dict(value)
        for key, item_spec in spec.fields.items():
            name = f"{path}.{key}" if path else key
            if key in value:
                result[key] = check(value[key], item_spec, source, name)
            elif item_spec.default is MISSING:
                raise ValueError(f"{source}: {name} is missing; it must be {item_spec.allowed()}")
            else:  # a default is checked too, so a missing table gets its own keys' defaults
                default = item_spec.default() if callable(item_spec.default) else item_spec.default
                result[key] = check(default, item_spec, source, name)
        return result
    raise TypeError(f"not a schema: {spec!r}")
