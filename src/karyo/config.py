"""Config dataclasses ↔ JSON. A model folder's config.json fully rebuilds the model (StarDist's Config/Model split)."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from karyo.errors import InputError, naming

T = TypeVar("T")


def to_dict(config: Any) -> dict:
    """Dataclass → plain JSON-ready dict (tuples become lists, nested dataclasses dicts)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{type(config).__name__} is not a dataclass")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def check_fields(cls: type, keys, source: str | os.PathLike | None = None) -> None:
    """Refuse keys that are not fields of the dataclass ``cls`` (a typo in a config's ``model:`` section would
    otherwise surface as a TypeError from deep inside a preset)."""
    unknown = sorted(set(keys) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InputError(source, f"unknown {cls.__name__} field(s) {unknown}")


def from_dict(cls: type[T], data: dict, source: str | os.PathLike | None = None) -> T:
    """Rebuild ``cls`` from :func:`to_dict` output; unknown keys are an error (they signal a version skew)."""
    if not isinstance(data, dict):
        raise InputError(source, f"{cls.__name__} config must be a JSON object")
    hints = typing.get_type_hints(cls)
    check_fields(cls, data, source)
    kwargs = {}
    for name, value in data.items():
        try:
            kwargs[name] = _convert(hints[name], value, source)
        except InputError:
            raise
        except (TypeError, ValueError) as exc:
            raise InputError(source, f"{cls.__name__}.{name}: {exc}") from None
    with naming(source):  # a config's own checks (__post_init__) do not know the file
        return cls(**kwargs)


def _convert(hint: Any, value: Any, source) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"expected {' or '.join(_type_name(a) for a in args if a is not type(None))}, got {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, source)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, source) for v in value)
        if args:
            return tuple(_convert(a, v, source) for a, v in zip(args, value, strict=False))
        return tuple(value)
    if origin is dict and args:
        return {_convert(args[0], k, source): _convert(args[1], v, source) for k, v in value.items()}
    if origin is list and args:
        return [_convert(args[0], v, source) for v in value]
    if hint in (int, float, bool, str):
        return _scalar(hint, value)
    return value


def _scalar(hint: type, value: Any) -> Any:
    """``value`` as ``hint``, or a TypeError/ValueError saying what was expected. YAML reads ``1e-4`` (no dot)
    as a string, so numbers in strings are accepted; a bool is not taken for a number, nor a fraction for an int."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if hint is float:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(number)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def save_json(path: str | os.PathLike, data: dict) -> Path:
    from karyo.data.io import write_text

    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"invalid JSON ({exc})") from None
