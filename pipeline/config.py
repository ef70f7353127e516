"""Typed configs: dataclasses loaded from YAML with command-line overrides.

Each verb has one dataclass whose fields carry their help text in ``metadata["help"]``.
Option *groups* (:class:`StorageOptions`, :class:`RayOptions`, the restorer's
``RestoreSettings``, ...) are dataclasses declared once and composed into every verb that
needs them with :func:`group`, in the style of litgpt's argument dataclasses. A group's
options appear as ordinary flat flags (``--storage-options``) and flat YAML keys; a YAML file
may also nest them under the group's field name (``storage: {options: ...}``).

The same classes drive the YAML loader, the ``--flag`` parser of the CLI and validation
(``__post_init__`` raises :class:`ConfigError` naming the option). Precedence: dataclass
defaults < ``--config FILE.yaml`` < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import yaml

from pipeline.errors import ConfigError, JobFailed

__all__ = [
    "ConfigError",
    "JobFailed",
    "Limits",
    "RayOptions",
    "StorageOptions",
    "check_limits",
    "from_args",
    "from_dict",
    "group",
    "option",
    "redefault",
]

C = TypeVar("C")


@dataclass(frozen=True)
class Limits:
    """An option's allowed values, declared with it (:func:`option`), checked by
    :func:`check_limits` and shown by ``--help``: a numeric range and/or a set of choices."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[Any, ...] | None = None
    noun: str = "value"  # what a choice is, for messages ("unknown task 'x'")

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        lo = "(-inf" if self.lo is None else ("(" if self.lo_open else "[") + f"{self.lo:g}"
        hi = "inf)" if self.hi is None else f"{self.hi:g}" + (")" if self.hi_open else "]")
        return f"in {lo}, {hi}"

    def check(self, name: str, value: Any, default: Any = None) -> None:
        """Raise ConfigError naming the option and what it allows. The option's own default
        (``""`` or 0 for "not set", None where the type allows it) always passes: ``require`` is
        what makes an option mandatory."""
        if value is None or value == default:
            return
        if self.choices is not None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v not in self.choices:
                    allowed = ", ".join(map(str, self.choices))
                    raise ConfigError(f"option {flag_of(name)!r}: unknown {self.noun} {v!r}; choose from {allowed}")
            return
        check_range(name, value, self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - the name argparse and dataclass users expect
    *,
    flag: str = "",
    short: str = "",
    range: tuple[float | None, float | None] | None = None,  # noqa: A002 - reads as the declaration it is
    lo_open: bool = False,
    hi_open: bool = False,
    choices: typing.Iterable[Any] | None = None,
    noun: str = "value",
    split: bool = True,
    **kw: Any,
) -> Any:
    """A dataclass field with help text (shown by ``--help``); ``flag`` overrides the flag name
    (``storage_options`` for ``--storage-options``), ``short`` adds a one-letter flag (``-n``).
    A list option is repeatable and each value is split at commas (``--tasks a,b``) unless
    ``split=False`` (free text such as a prompt, which keeps its commas).

    ``range=(lo, hi)`` (either end None for unbounded; ``lo_open``/``hi_open`` exclude an end)
    and ``choices`` declare the allowed values: ``--help`` shows them and :func:`check_limits`
    (called by every config's ``__post_init__``) refuses others, naming this one option."""
    meta: dict[str, Any] = {"help": help, "flag": flag} if flag else {"help": help}
    if short:
        meta["short"] = (short,)
    if not split:
        meta["split"] = False
    if range is not None or choices is not None:
        lo, hi = range if range is not None else (None, None)
        meta["limits"] = Limits(lo, hi, lo_open, hi_open, tuple(choices) if choices is not None else None, noun)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def redefault(cls: type, name: str, default: Any) -> Any:
    """The option ``name`` of the config class ``cls`` (help, flag, limits) with another default:
    a config that composes ``cls`` changes a default without re-declaring the option."""
    base = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=base.metadata)


def check_limits(cfg: Any) -> None:
    """Check every option of ``cfg`` (groups excluded: each checks its own) against the limits
    declared with it; the first one out of its limits raises ConfigError naming it."""
    for f in dataclasses.fields(cfg):
        limits = f.metadata.get("limits")
        if limits is not None:
            default = f.default if f.default is not dataclasses.MISSING else None
            limits.check(f.name, getattr(cfg, f.name), default)


def group(cls: type, *, private: bool = False) -> Any:
    """A field holding an option group; ``private`` groups (credentials, cluster addresses)
    are left out of :func:`public_dict`, so they never reach a manifest or checkpoint."""
    return dataclasses.field(default_factory=cls, metadata={"group": True, "private": private})


# --------------------------------------------------------------------------- the shared groups


@dataclass
class StorageOptions:
    """How to reach object storage. Credentials here are never written anywhere: this group is
    private (left out of :func:`public_dict`), and only printed text is redacted of them."""

    options: dict = option({}, "JSON of fsspec storage options (endpoint, credentials)", flag="storage_options")

    def __post_init__(self) -> None:
        from pipeline.io.storage import register_secrets

        _check_storage_options(self.options)
        register_secrets(self.options)  # so that no printed line can show them


# storage options that fsspec filesystems (s3fs, gcsfs, adlfs, ...) take as nested mappings
_NESTED_STORAGE_OPTIONS = ("client_kwargs", "config_kwargs", "s3_additional_kwargs", "session_kwargs", "headers")


def _check_storage_options(options: dict) -> None:
    """What can be told of ``--storage-options`` before any filesystem is built: nested option
    groups are mappings and an endpoint is a URL with a numeric port (one line naming it; no
    value is shown). Keys a filesystem does not take are refused when it is first built."""
    import urllib.parse

    from pipeline.io.storage import redact

    where = "option 'storage-options'"
    for name in _NESTED_STORAGE_OPTIONS:
        if name in options and not isinstance(options[name], dict):
            raise ConfigError(f"{where}: {name!r} must be a JSON object, got {type(options[name]).__name__}")
    nested = options.get("client_kwargs") or {}
    for holder, value in (
        ("endpoint_url", options.get("endpoint_url")),
        ("client_kwargs.endpoint_url", nested.get("endpoint_url")),
    ):
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {holder!r} must be a URL string, got {type(value).__name__}")
        try:
            parts = urllib.parse.urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError when the port is not a number
        except ValueError:
            raise ConfigError(f"{where}: {holder!r} {redact(value)} has a port that is not a number") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: {holder!r} {redact(value)} is not an http:// or https:// URL")


@dataclass
class RayOptions:
    """Which Ray to run on."""

    address: str = option("", "Ray cluster address (default: RAY_ADDRESS or a local Ray)", flag="ray_address")


# --------------------------------------------------------------------------- checks


def require(cfg: Any, *names: str) -> None:
    """Raise ConfigError for the first of ``names`` that is empty."""
    for name in names:
        if not getattr(cfg, name):
            raise ConfigError(f"option {flag_of(name)!r} is required")


def check_range(
    name: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ConfigError unless ``value`` is a finite number in the range (NaN never passes)."""
    bad = not math.isfinite(value)
    bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
    bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        where = f"in {lo_s or '(-inf'}, {hi_s or 'inf)'}"
        raise ConfigError(f"option {flag_of(name)!r} must be a finite number {where}, got {value!r}")


def flag_of(name: str) -> str:
    return name.rstrip("_").replace("_", "-")


# --------------------------------------------------------------------------- fields, flattened


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_group(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("group"))


def _flat_fields(cls: type) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path of field names, field, type) of every option, groups flattened."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_group(f):
            for path, sub, tp in _flat_fields(hints[f.name]):
                yield (f.name, *path), sub, tp
        else:
            yield (f.name,), f, hints[f.name]


def _key(f: dataclasses.Field) -> str:
    """The flat name of an option: its flag without dashes (``storage_options``)."""
    return f.metadata.get("flag", f.name)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(name: str, tp: Any, value: Any, split: bool = True) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to type ``tp``, or raise ConfigError;
    ``split``: a list of strings is also split at commas."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option {flag_of(name)!r} may not be empty")
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
                value = [value]
            if split and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                # `--tasks a,b`, a repeated flag `--text-encoder A --text-encoder B`, or both
                value = [part.strip() for v in value for part in v.split(",") if part.strip()]
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
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):
        shown = "<hidden>" if "storage" in name or "secret" in name else repr(value)[:80]
        raise ConfigError(f"option {flag_of(name)!r}: cannot read {shown} as {getattr(tp, '__name__', tp)}") from None
    return value


def from_dict(cls: type[C], values: dict[str, Any], *, section: str = "") -> C:
    """Build ``cls`` from a flat mapping (group options by their flat names, or nested under
    the group's field name); unknown keys raise ConfigError listing the valid ones."""
    flat = {_key(f): (path, tp, f.metadata.get("split", True)) for path, f, tp in _flat_fields(cls)}
    groups = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if _is_group(f)}
    pairs: list[tuple[str, Any]] = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in groups and isinstance(value, dict):
            inner = {_key(f): f.name for f in dataclasses.fields(_hints(cls)[name])}
            by_field = {v: k for k, v in inner.items()}
            pairs += [(by_field.get(str(k).replace("-", "_"), str(k)), v) for k, v in value.items()]
        else:
            pairs.append((name if name in flat or name + "_" not in flat else name + "_", value))
    unknown = [k for k, _ in pairs if k not in flat]
    if unknown:
        where = f" in {section}" if section else ""
        valid = ", ".join(sorted(flag_of(n) for n in flat))
        raise ConfigError(f"unknown option {flag_of(unknown[0])!r}{where}; valid options: {valid}")
    nested: dict[str, Any] = {}
    for key, value in pairs:
        path, tp, split = flat[key]
        target = nested
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = coerce(key, tp, value, split)
    return _build(cls, nested)


def _build(cls: type[C], kwargs: dict[str, Any]) -> C:
    hints = _hints(cls)
    for name, value in list(kwargs.items()):
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]):  # a group given as a mapping
            kwargs[name] = _build(hints[name], value)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required option is missing
        missing = [
            f.name
            for f in dataclasses.fields(cast(Any, cls))
            if f.name not in kwargs
            and f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"missing required option {flag_of(missing[0])!r}") from None
        raise ConfigError(str(exc)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def public_dict(cfg: Any) -> dict[str, Any]:
    """A config as recorded in manifests and checkpoints: private groups (storage options,
    Ray address) left out, so that no credential is in it by construction. Every value is
    stored as it is, but for URLs' ``user:password@``, which is left out
    (:func:`storage.public_url`): a stored value is never rewritten to hide a secret."""
    from pipeline.io.storage import public_url

    def walk(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {
                f.name: walk(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
                if not f.metadata.get("private") and not isinstance(getattr(obj, f.name), StorageOptions)
            }
        if isinstance(obj, dict):
            return {str(k): walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v) for v in obj]
        return public_url(obj) if isinstance(obj, str) and "://" in obj else obj

    return json.loads(json.dumps(walk(cfg)))


def load_yaml(path: str) -> dict[str, Any]:
    """A ``--config`` file: one mapping of option: value (plain YAML, no tags)."""
    from pipeline.io import storage

    try:
        text = storage.read_bytes(path).decode("utf-8")
        data = yaml.safe_load(text) or {}
    except (IsADirectoryError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise ConfigError(
            f"config file {path!r}: {type(exc).__name__.replace('Error', '').lower() or 'error'}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {path!r} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    return data


# --------------------------------------------------------------------------- CLI glue


def add_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per option of ``cls``, groups flattened (defaults left to the dataclass)."""
    for _path, f, tp in _flat_fields(cls):
        tp, _ = _strip_optional(tp)
        key = _key(f)
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        help_text = f.metadata.get("help", "")
        notes = []
        if default not in (None, "", [], (), {}) and "storage" not in key:
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            notes.append(f"default: {shown}")
        if f.metadata.get("limits") is not None:
            notes.append(f.metadata["limits"].describe())
        if notes:
            help_text += f" ({'; '.join(notes)})"
        if key in positional:
            parser.add_argument(key, nargs="?", default=None, help=help_text)
            continue
        flags = ["--" + flag_of(key)] + [f"-{s}" for s in f.metadata.get("short", ())]
        if tp is bool:
            parser.add_argument(*flags, dest=key, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(tp) is list:  # repeatable; each value may be a comma-separated list (split=True)
            parser.add_argument(*flags, dest=key, default=None, action="append", metavar=key.upper(), help=help_text)
        else:
            parser.add_argument(*flags, dest=key, default=None, metavar=key.rstrip("_").upper(), help=help_text)


def from_args(cls: type[C], args: argparse.Namespace, *, section: str) -> C:
    """Merge ``--config`` YAML (optionally a ``section:`` inside it) and flags into ``cls``."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = load_yaml(args.config)
        for name in (section, section.replace("_", "-")):  # `train_vae:` or `train-vae:`
            if name in data and isinstance(data[name], dict):
                data = data[name]
                break
        values.update(data)
    for _path, f, _tp in _flat_fields(cls):
        v = getattr(args, _key(f), None)
        if v is not None:
            values[_key(f)] = v
    return from_dict(cls, values, section=section)
