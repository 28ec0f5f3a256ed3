"""Base class for pass configs: frozen, validated on construction, JSON/YAML round-trippable.

Each transform has one frozen dataclass config. ``config_from_dict`` rebuilds any registered config from
its ``to_dict()`` form, which lets a recipe file (JSON or YAML) reproduce a compression.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

from .errors import ConfigError

_CONFIG_TYPES: dict[str, type["PassConfig"]] = {}


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base of all pass configs. Subclasses are frozen dataclasses and call ``register_config``."""

    type_name: ClassVar[str] = "PassConfig"
    #: old field names -> the new ones; given, they raise ConfigError naming the new name
    renamed: ClassVar[dict[str, str]] = {}

    def resolve(self, has_calibration: bool) -> "PassConfig":
        """The config with its ``"auto"`` settings resolved (whether calibration data was given)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PassConfig":
        data = dict(data)
        name = data.pop("type", cls.type_name)
        if name != cls.type_name:
            raise ConfigError(f"{cls.__name__}.from_dict got a config of type {name!r}")
        for old, new in cls.renamed.items():
            if old in data:
                raise ConfigError(f"{cls.__name__}: {old!r} was renamed to {new!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ validation
# What every config's ``__post_init__`` checks with: one message format for every pass.
def is_int(v: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def name_patterns(name: str, value: Any) -> tuple[str, ...]:
    """A field of name patterns (e.g. ``ignore``): one string or a sequence of strings, as a tuple."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{name} must be a tuple of name patterns, got {value!r}")
    return tuple(value)


def register_config(cls: type[PassConfig]) -> type[PassConfig]:
    """Class decorator: make ``cls`` reachable from ``config_from_dict`` under its ``type_name``."""
    if cls.type_name in _CONFIG_TYPES:
        raise ConfigError(f"config type {cls.type_name!r} is registered twice")
    _CONFIG_TYPES[cls.type_name] = cls
    return cls


def config_from_dict(data: dict[str, Any]) -> PassConfig:
    """Rebuild a config from ``to_dict()`` output (the ``type`` key selects the class)."""
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"a recipe entry must be a dict with a 'type' key, got {data!r}")
    name = data["type"]
    if name not in _CONFIG_TYPES:
        raise ConfigError(f"unknown config type {name!r}; known: {sorted(_CONFIG_TYPES)}")
    return _CONFIG_TYPES[name].from_dict(data)


def load_recipe(path: str) -> list[PassConfig]:
    """Read a list of configs from a JSON or YAML file (a list, or a dict with key ``passes``)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the environment
            from .errors import MissingDependencyError

            raise MissingDependencyError("pyyaml", "yaml", "Reading a YAML recipe") from exc
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("passes", [data])
    if not isinstance(data, list):
        raise ConfigError(f"recipe {path!r} must hold a list of configs")
    return [config_from_dict(d) for d in data]
