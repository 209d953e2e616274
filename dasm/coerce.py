"""Typed values from YAML files and ``--set key=value``: coercion of a nested mapping into a
dataclass tree (each value checked against its field's annotation and choices), dotted-key
overrides, and YAML files read safely. Generic: it knows no field of the schema."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, List, Union, get_args, get_origin, get_type_hints

import yaml

from . import io
from .errors import ConfigError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Coerce a YAML/CLI value to the annotated type ``tp`` or raise ConfigError."""
    origin = get_origin(tp)
    if origin is Union:
        errors = []
        for member in get_args(tp):
            try:
                return _coerce(value, member, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} is not one of "
                          f"{' | '.join(_type_name(a) for a in get_args(tp))}")
    if origin in (list, List):
        (inner,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        return _integer(value, key)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _integer(value: Any, key: str) -> int:
    """An integer read exactly (never through a float, which rounds above 2^53): an int, a
    string of digits, or a whole float below 2^53 (``1e3``)."""
    bad = ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise bad from None
    if not math.isfinite(value) or value != int(value) or abs(value) >= 2 ** 53:
        raise bad  # a float this large has already lost digits: ask for the integer itself
    return int(value)


def build_dataclass(cls, data: dict, prefix: str = ""):
    """An instance of the dataclass ``cls`` from the nested mapping ``data``: every value
    coerced to its field's annotation and choices, unknown keys refused; ``prefix``: the dotted
    path of ``data`` (for messages). Raises ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' "
                          f"(valid keys here: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, data.get(name, {}) or {}, key + ".")
            continue
        if name not in data:
            continue
        value = _coerce(data[name], tp, key)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(choices)}")
        kwargs[name] = value
    return cls(**kwargs)


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document of ``path`` (the safe loader, duplicate keys refused). A missing
    file, a folder, bytes that are not UTF-8 and bad YAML are one ConfigError naming ``what``
    ``path``, with the line where PyYAML places the problem."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                          f"offset {e.start})") from None
    try:
        return io.load_yaml(text)
    except yaml.YAMLError as e:  # one line: the problem, not PyYAML's position markers
        what_went_wrong = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: "
                          f"{' '.join(what_went_wrong.split())}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = io.load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``--set`` items -> ``{dotted key: value}`` (later items win)."""
    return dict(parse_override(o) for o in items or [])


def with_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """A deep copy of the config mapping ``data`` with dotted-key ``overrides`` applied."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"unknown config key '{key}'")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data
