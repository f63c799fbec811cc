"""Named model sizes: a registry of dataclass configs per model, and one way to pick and adjust one."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

Config = TypeVar("Config")


def config_from_size(
    registry: dict[str, Config], size: str, overrides: dict, key: str = "model.net"
) -> Config:
    """The config named `size` in `registry` with `overrides` applied; errors name the config key `key`."""
    if size not in registry:
        raise ValueError(f"{key}.size: unknown size {size!r}; choose from {sorted(registry)}")
    base = registry[size]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{key}: unknown {type(base).__name__} field(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(base, **overrides)
