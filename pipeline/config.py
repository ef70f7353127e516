"""Typed configs: dataclasses loaded from YAML with command-line overrides.

Each stage has one dataclass whose fields carry their help text in ``metadata["help"]``.
The same class drives the YAML loader, the ``--flag`` parser of the CLI and validation
(``__post_init__`` raises :class:`ConfigError` naming the option). Precedence:
dataclass defaults < ``--config FILE.yaml`` < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """An unknown or invalid option; the message names it."""


def option(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with help text (shown by ``--help``)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to type ``tp``, or raise ConfigError."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option {name!r} may not be empty")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            out = tp(value)
            if tp is int and isinstance(value, float) and value != out:
                raise ValueError(value)
            return out
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if origin in (list, tuple):
            (item_tp, *_rest) = typing.get_args(tp) or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            items = [coerce(name, item_tp, v) for v in value]
            return tuple(items) if origin is tuple else items
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = json.loads(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        shown = "<hidden>" if "storage" in name or "secret" in name else repr(value)
        raise ConfigError(f"option {name!r}: cannot read {shown} as {getattr(tp, '__name__', tp)}") from None
    return value


def from_dict(cls: type[C], values: dict[str, Any], *, section: str = "") -> C:
    """Build ``cls`` from a mapping; unknown keys raise ConfigError listing the valid ones."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def field_name(key: str) -> str:  # `class` names the field `class_` (a Python keyword)
        name = key.replace("-", "_")
        return name + "_" if name not in fields and name + "_" in fields else name

    unknown = [k for k in values if field_name(k) not in fields]
    if unknown:
        where = f" in {section}" if section else ""
        valid = ", ".join(sorted(n.rstrip("_") for n in fields))
        raise ConfigError(f"unknown option {unknown[0]!r}{where}; valid options: {valid}")
    kwargs = {}
    for key, value in values.items():
        name = field_name(key)
        kwargs[name] = coerce(name, hints[name], value)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required option is missing
        missing = [n for n, f in fields.items() if n not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"missing required option {missing[0]!r}") from None
        raise ConfigError(str(exc)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def load_yaml(path: str) -> dict[str, Any]:
    from . import storage

    data = yaml.safe_load(storage.read_bytes(path).decode("utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    return data


# --------------------------------------------------------------------------- CLI glue

def add_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of ``cls`` (defaults left to the dataclass)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if default not in (None, "", [], ()) and "storage" not in f.name:
            help_text += f" (default: {default if not isinstance(default, (list, tuple)) else ','.join(map(str, default))})"
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", default=None, help=help_text)
            continue
        flag = "--" + f.name.rstrip("_").replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def from_args(cls: type[C], args: argparse.Namespace, *, section: str) -> C:
    """Merge ``--config`` YAML (optionally a ``section:`` inside it) and flags into ``cls``."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = load_yaml(args.config)
        if section in data and isinstance(data[section], dict):
            data = data[section]
        values.update(data)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    return from_dict(cls, values, section=section)
