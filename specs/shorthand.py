"""Shorthand parsers, in one place, used as pydantic before-validators.

``"A100:8"`` -> ``{"A100": 8}``; ``"24GB"`` -> ``24.0`` (GiB); ``"4h"`` -> ``4.0`` (hours);
``"$25"`` -> ``25.0`` (USD). Each returns its input unchanged when it is not a
string it recognises, so pydantic's own type errors stay the ones users see.
"""

from __future__ import annotations

import re
from typing import Any

_ACC = re.compile(r"^\s*([A-Za-z][A-Za-z0-9._-]*)\s*(?::\s*(\d+))?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|[kmgt]i?b?)?\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|hours?|d|days?)?\s*$", re.I)
_MONEY = re.compile(r"^\s*\$?\s*(\d+(?:\.\d+)?)\s*(?:usd)?\s*$", re.I)

_SIZE_TO_GB = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
_DURATION_TO_H = {"s": 1 / 3600, "m": 1 / 60, "h": 1.0, "d": 24.0}


def parse_accelerator(value: Any) -> Any:
    """``"A100:8"`` or ``"A100"`` -> ``{"A100": 8}`` / ``{"A100": 1}``; dicts pass through."""
    if isinstance(value, str):
        m = _ACC.match(value)
        if not m:
            raise ValueError(f"accelerator {value!r} is not NAME or NAME:COUNT, e.g. 'A100:8'")
        return {m.group(1): int(m.group(2) or 1)}
    return value


def parse_accelerators(value: Any) -> Any:
    """One accelerator (str or mapping) or a list of them meaning any-of -> a list of
    single-entry mappings. ``{"A100": 8, "H100": 8}`` (several keys) means any-of too."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    out: list[Any] = []
    for item in items:
        item = parse_accelerator(item)
        if isinstance(item, dict) and len(item) > 1:
            out.extend({k: v} for k, v in item.items())
        else:
            out.append(item)
    return out


def parse_size_gb(value: Any) -> Any:
    """``"24GB"``, ``"512MB"``, ``"1TB"``, ``"24"`` -> GiB as float."""
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"size {value!r} is not a number with a unit, e.g. '24GB'")
        unit = (m.group(2) or "G")[0].upper()
        return float(m.group(1)) * _SIZE_TO_GB[unit]
    return value


def parse_hours(value: Any) -> Any:
    """``"4h"``, ``"30m"``, ``"90s"``, ``"2d"``, ``"1.5"`` -> hours as float."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"duration {value!r} is not a number with a unit, e.g. '4h' or '30m'")
        unit = (m.group(2) or "h")[0].lower()
        return float(m.group(1)) * _DURATION_TO_H[unit]
    return value


def parse_usd(value: Any) -> Any:
    """``"$25"``, ``"25 USD"``, ``"25"`` -> 25.0."""
    if isinstance(value, str):
        m = _MONEY.match(value)
        if not m:
            raise ValueError(f"amount {value!r} is not a dollar figure, e.g. '$25' or 25.0")
        return float(m.group(1))
    return value
