"""Typed loading of a config tree made of nested dataclasses, and writing it back as TOML.

Precedence, lowest first: dataclass defaults < ``base`` dict < TOML file < ``key=value`` overrides.
Each value is checked against its field's type hint as soon as it is read, so an error names its
source (the file, or the override) and the dotted key.

None: TOML has no null, so for an ``X | None`` field the string "none" (any case) means None, in a
file, a base dict or an override (a base dict may also hold a real None); a missing key keeps the
default. The price is that a ``str | None`` field cannot hold the text "none". ``dump_toml`` writes
None as "none", so a dumped config loads back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from lbva.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

T = TypeVar("T")

NONE_WORD = "none"

# Python types a TOML value may have for each scalar field type (an int is fine for a float).
_ACCEPTED = {bool: (bool,), int: (int,), float: (int, float), str: (str,), Path: (str, Path)}

_SIMPLE_TYPE_NAMES = {
    bool: "a bool (true or false)",
    int: "an int",
    float: "a float",
    str: "a string",
    Path: "a path (string)",
}

# Basic-string escapes: TOML forbids raw control characters and DEL inside "..." strings.
_TOML_ESCAPES = {c: f"\\u{c:04x}" for c in [*range(0x20), 0x7F]}
_TOML_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t"})


def load_config(
    cls: type[T],
    path: Path | None = None,
    overrides: Sequence[str] = (),
    *,
    base: dict | None = None,
) -> T:
    """Build a ``cls`` instance from its defaults, then ``base``, the TOML file and the overrides.

    Every dataclass in the result that defines ``validate()`` has it called, children first.
    Raises UserError for unknown keys, wrong types, bad TOML or a missing file.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    # One nested dict of already type-checked values; later layers replace leaves of earlier ones.
    merged: dict[str, Any] = {}
    if base is not None:
        _merge_layer(cls, base, "base config", [], merged)
    if path is not None:
        _merge_layer(cls, _read_toml(Path(path)), str(path), [], merged)
    for text in overrides:
        keys, value = parse_override(text)
        for key in reversed(keys):
            value = {key: value}
        _merge_layer(cls, value, f"override '{text}'", [], merged)
    config = _build(cls, merged, None, [])
    _validate(config)
    return config


def parse_override(text: str) -> tuple[list[str], object]:
    """Split ``"optim.lr=3e-4"`` into ``(["optim", "lr"], 3e-4)``.

    The value is read as a TOML value (numbers, booleans, lists, quoted strings); text that is not
    valid TOML is kept as a bare string, so ``run.name=demo`` works without quotes.
    """
    key, sep, raw = text.partition("=")
    keys = [part.strip() for part in key.split(".")]
    if not sep or not all(keys):
        raise UserError(f"override '{text}': expected section.key=value, e.g. optim.lr=3e-4")
    raw = raw.strip()
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return keys, raw
    # A value with a newline could smuggle in more keys; such text is not one TOML value.
    return keys, parsed["v"] if len(parsed) == 1 else raw


def config_to_dict(obj: Any) -> dict:
    """Return the config as a plain nested dict of TOML-able values.

    Paths become strings, tuples become lists and None becomes "none" (see the module docstring).
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {obj!r}")
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def dump_toml(obj: Any, path: Path) -> None:
    """Write the resolved config ``obj`` to ``path`` as TOML that loads back to an equal object."""
    lines = _toml_table(config_to_dict(obj), [])
    Path(path).write_text("\n".join(lines).strip() + "\n", encoding="utf-8")


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read config file: {exc.strerror}") from None


def _field_types(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations left by `from __future__ import annotations`.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (X, True) for ``X | None`` / ``Optional[X]``, else (tp, False)."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return tp, False
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) != 1 or len(args) == len(typing.get_args(tp)):
        raise TypeError(f"config_io supports only 'X | None' unions, not {tp!r}")
    return args[0], True


def _is_none(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.lower() == NONE_WORD)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _merge_layer(cls: type, raw: dict, source: str, prefix: list[str], into: dict) -> None:
    """Check one layer's keys and values against ``cls`` and write them over ``into``."""
    hints = _field_types(cls)
    for key, value in raw.items():
        dotted = ".".join([*prefix, key])
        if key not in hints:
            section = f"[{'.'.join(prefix)}]" if prefix else "the top level"
            known = ", ".join(hints)
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"{source}: unknown key '{dotted}'; known keys in {section}: {known}{hint}"
            )
        inner, optional = _unwrap_optional(hints[key])
        if optional and _is_none(value):
            into[key] = None
        elif _is_dataclass_type(inner):
            if not isinstance(value, dict):
                raise UserError(
                    f"{source}: {dotted} is a table of settings, got {value!r} "
                    f"({type(value).__name__}); set its keys instead, e.g. {dotted}.<key>=..."
                )
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge_layer(inner, value, source, [*prefix, key], into[key])
        elif isinstance(value, dict):
            raise UserError(
                f"{source}: {dotted} is a single value ({_describe(hints[key])}), not a table"
            )
        else:
            into[key] = _convert(value, hints[key], dotted, source)


def _describe(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if optional:
        return f'{_describe(inner)} or "{NONE_WORD}"'
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)} items"
    if origin in (list, tuple):
        return "a list"
    return _SIMPLE_TYPE_NAMES.get(tp, repr(tp))


def _convert(value: object, tp: Any, dotted: str, source: str) -> object:
    """Check ``value`` against the type hint ``tp`` and return it in the field's Python type."""
    inner, optional = _unwrap_optional(tp)
    if optional:
        return None if _is_none(value) else _convert(value, inner, dotted, source)
    wrong_type = UserError(
        f"{source}: {dotted} must be {_describe(tp)}, got {value!r} ({type(value).__name__})"
    )
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # Compare types too, so that True does not pass for Literal[1].
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise wrong_type
    if origin in (list, tuple) and args:
        if not isinstance(value, (list, tuple)):
            raise wrong_type
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise UserError(
                    f"{source}: {dotted} must have exactly {len(args)} items, "
                    f"got {len(value)}: {value!r}"
                )
            item_types = list(args)
        else:
            item_types = [args[0]] * len(value)
        items = [
            _convert(v, t, f"{dotted}[{i}]", source)
            for i, (v, t) in enumerate(zip(value, item_types))
        ]
        return origin(items)
    if tp not in _ACCEPTED:
        raise TypeError(f"config_io: unsupported field type {tp!r} for '{dotted}'")
    # bool is a subclass of int: a bool may fill only a bool field, and 0/1 never fill one.
    if not isinstance(value, _ACCEPTED[tp]) or (isinstance(value, bool) and tp is not bool):
        raise wrong_type
    return tp(value)


def _field_default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _build(cls: type, tree: dict, default: object, prefix: list[str]) -> Any:
    """Construct ``cls`` from checked values in ``tree``; keys not in it come from ``default``.

    ``default`` is the instance this table replaces (e.g. a parent's default_factory result), so a
    partial table keeps the non-class defaults of the keys it does not set.
    """
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        dotted = ".".join([*prefix, field.name])
        if field.name in tree:
            value = tree[field.name]
            if isinstance(value, dict):  # a table for a nested dataclass
                inner, _ = _unwrap_optional(hints[field.name])
                sub = getattr(default, field.name) if default is not None else _field_default(field)
                sub = sub if isinstance(sub, inner) else None
                value = _build(inner, value, sub, [*prefix, field.name])
            kwargs[field.name] = value
        elif default is not None:
            kwargs[field.name] = getattr(default, field.name)
        elif _field_default(field) is dataclasses.MISSING:
            raise UserError(
                f"config: missing required key '{dotted}'; set it in the TOML file or an override"
            )
    return cls(**kwargs)


def _validate(obj: Any) -> None:
    """Call ``validate()`` on every dataclass in the tree, children before their parents."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _validate(value)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if value is None:
        return NONE_WORD
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _toml_table(table: dict, prefix: list[str]) -> list[str]:
    """TOML lines for ``table``: its plain keys first, as TOML requires, then its sub-tables."""
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)
    ]
    for key, value in table.items():
        if isinstance(value, dict):
            name = [*prefix, key]
            lines += ["", f"[{'.'.join(_toml_key(k) for k in name)}]", *_toml_table(value, name)]
    return lines


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest exact form; Python's "1e-05" is also valid TOML
    if isinstance(value, str):
        return '"' + value.translate(_TOML_ESCAPES) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")
