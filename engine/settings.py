"""Settings declared once, as fields of frozen dataclasses; their command-line flags, help text and
JSON loading are derived from the fields (as vLLM's engine/arg_utils.py derives its flags), so a
flag without a field cannot exist.

    @dataclass(frozen=True)
    class Example:
        max_num_seqs: int = setting(32, "most sequences running at once")
        cache_memory: int = setting(1 << 30, "bytes for the cache, e.g. 2GiB", parse=parse_bytes, shown="1GiB")

A field's flag is its name with dashes (`--max-num-seqs`). Its type comes from the annotation
(`int | None` parses an int; a bool is `--x` / `--no-x`; `tuple[str, ...]` takes one or more
values); any other type needs `parse`. A field without a default is a required flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None,
            parse: Callable[[str], Any] | None = None, choices: tuple | None = None, metavar: str | None = None,
            shown: str | None = None) -> Any:
    """A dataclass field and its flag: help text `doc`, the default (or a `factory` called when the
    parser is built), optionally a parser of the flag's text, the allowed choices, a metavar and
    how --help shows the default (`shown`; None defaults are not shown unless given)."""
    meta = {"doc": doc, "parse": parse, "choices": choices, "metavar": metavar, "shown": shown}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def add_flags(parser: argparse.ArgumentParser, cls: type, *, overrides: bool = False,
              defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per field of dataclass `cls`, grouped under the first line of its docstring. The
    parsed default is the field's, or this command's from `defaults` (shown in the help too); with
    `overrides`, a flag not given is absent from the namespace (so that the flags given can go over a
    JSON file's values, see from_args)."""
    group = parser.add_argument_group(cls.__doc__.strip().splitlines()[0].rstrip("."))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(defaults or ()) - names:
        raise TypeError(f"{cls.__name__} has no field {sorted(set(defaults) - names)[0]}")
    for f in dataclasses.fields(cls):
        if not f.metadata.get("doc"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with setting()")
        default = (defaults or {}).get(f.name, _default(f))
        kw = _argument(f, _strip_none(hints[f.name]), f"{cls.__name__}.{f.name}")
        if overrides:
            kw["default"] = argparse.SUPPRESS
        elif default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
        action = group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
        action.help = _help(f, default)  # set afterwards: BooleanOptionalAction appends its own default


def from_args(cls: type[T], ns: argparse.Namespace, base: Mapping[str, Any] | None = None) -> T:
    """`cls` from the parsed flags of its fields, over `base` (e.g. a JSON file's values)."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    return build(cls, {**(base or {}), **given}, cls.__name__)


def check_fields(cls: type, values: object, where: str) -> dict[str, Any]:
    """`values` as a dict of `cls`'s field names; ValueError naming `where` when it is not an object
    or has a key that is no field."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected an object of {cls.__name__} settings")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} fields {unknown}")
    return dict(values)


def build(cls: type[T], values: object, where: str) -> T:
    """`cls` from a mapping of its field names (JSON lists become tuples); ValueError naming `where`
    on an unknown key, a missing value or a value its checks refuse."""
    values = check_fields(cls, values, where)
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def read_json(path: str | Path) -> Any:
    """A JSON file's content; FileNotFoundError / ValueError with the path when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _argument(f: dataclasses.Field, kind: Any, name: str) -> dict[str, Any]:
    """add_argument's keywords for the value of field f of type `kind`."""
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    parse = f.metadata["parse"]
    variadic = typing.get_origin(kind) is tuple and typing.get_args(kind)[1:] == (...,)
    if not (parse or variadic or kind in (str, int, float)):
        raise TypeError(f"{name}: a {kind} flag needs parse=")
    kw: dict[str, Any] = {"type": parse or (typing.get_args(kind)[0] if variadic else kind)}
    if variadic and not parse:
        kw["nargs"] = "+"
    return kw | {key: f.metadata[key] for key in ("choices", "metavar") if f.metadata[key] is not None}


def _strip_none(kind: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    return kind


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default_factory is MISSING else f.default_factory()


def _help(f: dataclasses.Field, default: Any) -> str:
    shown = f.metadata["shown"] if default == _default(f) else None  # a command's own default is shown as it is
    if shown is None and default is not MISSING and default is not None:
        shown = ("on" if default else "off") if isinstance(default, bool) else str(default)
    text = f.metadata["doc"] + (f" (default: {shown})" if shown is not None else "")
    return text.replace("%", "%%")
