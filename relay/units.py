"""Parsing of human-friendly sizes ("30MiB"), durations ("5d", "30s") and rates ("50/s")."""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 1}
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-zA-Z]+)\s*$")
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Return a byte count from an int or a string such as ``30MiB``, ``512k`` or ``1048576``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 30MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
            if size < 2**63:
                return int(size)
            raise ValueError(f"size {value!r} is too large")
    raise ValueError(f"expected a size such as 30MiB, 512KiB or a byte count, got {value!r}")


def parse_duration(value: object) -> float:
    """Return seconds from a number or a string such as ``30s``, ``5m``, ``2h``, ``5d``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match and match.group(2).lower() in _DURATION_UNITS:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    raise ValueError(f"expected a duration such as 30s, 5m, 2h or 5d, got {value!r}")


def parse_rate(value: object) -> float | None:
    """Messages per second from ``50/s``, ``3000/m`` or ``100000/h``; ``unlimited`` is None."""
    if isinstance(value, str):
        if value.strip().lower() == "unlimited":
            return None
        match = _RATE.match(value)
        if match and match.group(2).lower() in _RATE_UNITS:
            count = float(match.group(1))
            if count <= 0:
                raise ValueError(f"a rate must be more than 0, got {value!r} (leave it out "
                                 "for no limit)")
            return count / _RATE_UNITS[match.group(2).lower()]
    raise ValueError(f"expected a rate such as 50/s, 3000/m or 100000/h, got {value!r}")


def format_rate(per_second: float) -> str:
    """Render messages per second the way a user would write the rate (``50/s``, ``100/h``)."""
    for unit in ("s", "m", "h"):
        count = per_second * _RATE_UNITS[unit]
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}/{unit}"
    return f"{per_second * 3600:g}/h"


def format_size(size: int) -> str:
    """Render a byte count the way a user would write it (``20MiB``)."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """Render seconds compactly (``5d``, ``30m``, ``45s``)."""
    for unit, factor in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"
