"""Strict, typed stage settings: frozen dataclasses filled from recipe mappings.

Unknown keys and wrong types are refused with the list of what is allowed; ranges are checked by
each config's `check()`. Importing this module must not import torch (used by `--dry-run`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from kbvq_cli.errors import KbvqError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except KbvqError as error:
                errors.append(str(error))
        raise KbvqError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise KbvqError(f"{where} must be one of {', '.join(map(str, allowed))} (got {value!r})")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, tuple):
        if isinstance(value, str):
            value = [part for part in value.split(",") if part]
        if isinstance(value, (list, tuple)):
            (item_type, *_) = typing.get_args(annotation) or (str,)
            return tuple(_coerce(item, item_type, where) for item in value)
    else:
        return value
    raise KbvqError(f"{where} must be {getattr(annotation, '__name__', annotation)} (got {value!r})")


def parse_settings(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build `cls` from a mapping; refuse unknown keys and mistyped values, then run `check()`."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise KbvqError(f"{where}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    values = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    settings = cls(**values)
    check = getattr(settings, "check", None)
    if check is not None:
        check(where)
    return settings


def settings_dict(settings: Any) -> dict:
    """The resolved settings as plain JSON-able data (tuples become lists)."""
    out = {}
    for key, value in dataclasses.asdict(settings).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def require(condition: bool, message: str) -> None:
    if not condition:
        raise KbvqError(message)
