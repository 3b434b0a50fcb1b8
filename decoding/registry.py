"""The one registry of decoding plug-ins: selection strategies and distribution transforms.

Each plug-in is registered under the tag of its params Struct (`msgspec.Struct, tag="beam"`),
and that tag is its name everywhere: the `SamplingParams.strategy` / `transforms` value, the
command line's `--strategy` choice (`--transform` for transforms), the gRPC field (a built-in's
`DecodingStrategy` oneof field, or `DecodingStrategy.plugin.name` / `Transform.name` for any
registered plug-in), `GetModelInfo.strategies` and the error messages. Nothing else keeps a
list of names.

Registering is one decorator in the plug-in's own file:

    @register_strategy(MyParams)
    class MyStrategy(SelectionStrategy): ...

`parse_params` turns a field mapping (decoded JSON, a protobuf message as a dict) into the
params Struct, validated once, with errors that name the field path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from decoding.base import InvalidArgument, SelectionStrategy, Transform


class Entry(msgspec.Struct, frozen=True):
    """One registered plug-in."""

    name: str
    """The params Struct's tag."""
    params_type: type
    cls: type
    """The SelectionStrategy or Transform subclass."""
    kind: str
    """"strategy" or "transform"."""

    @property
    def batchable(self) -> bool:
        return self.kind == "strategy" and self.cls.batchable


_ENTRIES: dict[str, Entry] = {}
_BY_PARAMS: dict[type, Entry] = {}


def _tag(params_type: type) -> str:
    config = getattr(params_type, "__struct_config__", None)
    if config is None or not isinstance(config.tag, str):
        raise TypeError(f"{params_type.__name__} must be a msgspec Struct with a string tag")
    return config.tag


def _register(params_type: type, kind: str, base: type):
    def wrap(cls: type) -> type:
        if not issubclass(cls, base):
            raise TypeError(f"{cls.__name__} must subclass {base.__name__}")
        name = _tag(params_type)
        existing = _ENTRIES.get(name)
        if existing is not None and existing.params_type is not params_type:
            raise ValueError(f"a plug-in named {name!r} is already registered")
        entry = Entry(name=name, params_type=params_type, cls=cls, kind=kind)
        _ENTRIES[name] = _BY_PARAMS[params_type] = entry
        return cls

    return wrap


def register_strategy(params_type: type):
    """Class decorator: the selection strategy of requests whose strategy is `params_type`."""
    return _register(params_type, "strategy", SelectionStrategy)


def register_transform(params_type: type):
    """Class decorator: the transform applied to rows that list a `params_type` value."""
    return _register(params_type, "transform", Transform)


def unregister(name: str) -> None:
    """Removes a plug-in (tests that register one for their own duration)."""
    found = _ENTRIES.pop(name)
    del _BY_PARAMS[found.params_type]


def entry(name_or_params: str | Any) -> Entry:
    """The entry of a plug-in name or params value; KeyError names what is registered."""
    if isinstance(name_or_params, str):
        found = _ENTRIES.get(name_or_params)
    else:
        found = _BY_PARAMS.get(type(name_or_params))
    if found is None:
        raise KeyError(f"no plug-in registered for {name_or_params!r}")
    return found


def strategies() -> list[Entry]:
    """Registered selection strategies, in registration order."""
    return [e for e in _ENTRIES.values() if e.kind == "strategy"]


def strategy_names() -> list[str]:
    return [e.name for e in strategies()]


def transforms() -> list[Entry]:
    """Registered transforms, in chain order."""
    found = [e for e in _ENTRIES.values() if e.kind == "transform"]
    return sorted(found, key=lambda e: e.cls.order)


def transform_names(*, plugins_only: bool = False) -> list[str]:
    """Names of the registered transforms; `plugins_only` leaves out the built-ins that
    `SamplingParams` fields drive (their params are those fields)."""
    return [e.name for e in transforms()
            if not (plugins_only and getattr(e.cls, "builtin", False))]


def create_strategy(params) -> SelectionStrategy:
    """The strategy instance of one generation."""
    return entry(params).cls(params)


def create_transforms() -> list[Transform]:
    """One instance of every registered transform, in chain order (one chain per engine)."""
    return [e.cls() for e in transforms()]


def parse_params(name: str, fields: Mapping[str, Any] | None, kind: str,
                 path: str = "") -> Any:
    """The params Struct of plug-in `name` from a field mapping, validated.

    Raises:
        InvalidArgument: unknown name (field `path` or "strategy" / "transforms"), or a field
            of the wrong type or out of range (field `path.<field>`).
    """
    where = path or kind
    found = _ENTRIES.get(name)
    if found is None or found.kind != kind:
        known = ", ".join(e.name for e in _ENTRIES.values() if e.kind == kind)
        raise InvalidArgument(where, f"unknown {kind} {name!r}; registered: {known}")
    unknown = sorted(set(fields or ()) - set(found.params_type.__struct_fields__))
    if unknown:
        field = f"{path}.{unknown[0]}" if path else unknown[0]
        raise InvalidArgument(field, f"{name} has no such parameter")
    try:
        # Field values travel as JSON-like data (protobuf int64 arrives as a string).
        return msgspec.convert({**(fields or {}), "type": name}, found.params_type, strict=False)
    except msgspec.ValidationError as exc:
        if isinstance(exc.__cause__, InvalidArgument):  # raised by the Struct's __post_init__
            raise exc.__cause__.under(path) from None
        field, reason = _split_validation_error(str(exc))
        raise InvalidArgument(f"{path}.{field}" if path and field else field or where,
                              reason) from None


def _split_validation_error(message: str) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.top_k`" -> ("top_k", "expected int, ...")."""
    reason, sep, at = message.partition(" - at `$.")
    if not sep:
        return "", message
    return at.rstrip("`").replace("[", ".").replace("]", ""), reason.replace("`", "")
