"""The settings toolkit: parsed YAML -> typed values, with errors that name the exact key.

``relay.config`` reads every section with it and ``relay.rules`` reads the ``rules`` list with
it, so both answer alike:

- an error names its path: ``upstream.port``, ``listeners[0].tls``,
  ``rules[0] ("newsletters").when.client``. List indexes count from 0, as in JSON Pointer and
  most tools (``listeners[0]`` is the first listener); a rule's path also names the rule;
- an unknown key is refused with the closest known one ("did you mean ...?") and the list of
  known keys;
- ``${VAR}`` expansion yields strings, so every converter accepts the string spelling of its
  value: ``"true"``, ``"8"``, ``"30s"``, ``"10.0.0.0/8,192.168.0.0/16"``;
- a key that is left out (or null) takes the default written on its dataclass field, unless
  the caller gives one that depends on something else (an environment variable, another key).

Converters take the raw value and return the typed one or raise ValueError with a message
that reads after ``path: ``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import ConfigError
from relay.netaddr import IPNetwork

T = TypeVar("T")


class _FieldDefault:
    """Marker: take the default from the section's dataclass field."""


FIELD_DEFAULT = _FieldDefault()


# --------------------------------------------------------------------------- paths and messages


def join(path: str, key: str) -> str:
    """``upstream`` + ``port`` -> ``upstream.port``; a top-level key stands alone."""
    return f"{path}.{key}" if path else key


def item_path(path: str, index: int, name: str = "") -> str:
    """The path of a list item: ``rules[0]``, or ``rules[0] ("newsletters")`` with a name."""
    return f'{path}[{index}] ("{name}")' if name else f"{path}[{index}]"


def describe(value: object) -> str:
    """How a wrong value is shown in a message: ``nothing``, ``list``, ``int 5``."""
    if value is None:
        return "nothing"
    if isinstance(value, dict | list):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``"; did you mean X?"`` for the closest choice (case-insensitive), or ``""``."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]}?" if close else ""


def reject_unknown_keys(mapping: Mapping[Any, object], known: Sequence[str], path: str) -> None:
    """Raise ConfigError for the first key of ``mapping`` that is not in ``known``."""
    for key in mapping:
        if key not in known:
            hint = did_you_mean(str(key), known)
            listing = f"expected one of {', '.join(known)}"
            message = f"unknown key{hint} ({listing})" if hint else f"unknown key; {listing}"
            raise ConfigError(join(path, str(key)), message)


def convert(value: object, parse: Callable[[Any], T], path: str) -> T:
    """``parse(value)``, with a ValueError or TypeError turned into a ConfigError at ``path``."""
    try:
        return parse(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(path, str(exc)) from None


def field_default(model: type, name: str) -> Any:
    """The default written on dataclass ``model``'s field ``name``."""
    for item in dataclasses.fields(model):
        if item.name != name:
            continue
        if item.default is not dataclasses.MISSING:
            return item.default
        if item.default_factory is not dataclasses.MISSING:
            return item.default_factory()
        break
    raise LookupError(f"{model.__name__}.{name} has no default")


# --------------------------------------------------------------------------- sections


class Section:
    """A mapping being read: tracks the path for errors and refuses unknown keys.

    ``model`` is the dataclass whose field defaults apply; ``env`` holds the environment
    variables that ``convert(..., var=...)`` may take a default from; ``keys``, when given,
    are checked at once (otherwise ``finish`` refuses every key that was not read).
    """

    def __init__(
        self,
        raw: object,
        path: str,
        *,
        model: type | None = None,
        env: Mapping[str, str] | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path, f"must be a mapping, got {describe(raw)}")
        if keys is not None:
            reject_unknown_keys(raw, keys, path)
        self.raw: dict[Any, Any] = raw
        self.path = path
        self._model = model
        self._env = env or {}
        self._read: dict[str, None] = {}  # keys in the order they were read

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        self._read[key] = None
        value = self.raw.get(key)
        return default if value is None else value

    def at(self, key: str) -> str:
        return join(self.path, key)

    def default(self, key: str) -> Any:
        """The default on the section's dataclass field ``key``."""
        if self._model is None:
            raise LookupError(f"{self.path}: no dataclass to take the default of {key} from")
        return field_default(self._model, key)

    def convert(
        self,
        key: str,
        parse: Callable[[Any], Any],
        default: Any = FIELD_DEFAULT,
        *,
        var: str = "",
    ) -> Any:
        """The value of ``key`` parsed; if unset, environment variable ``var`` parsed (its
        errors name the variable and the key); if unset too, ``default`` (the field's unless
        given)."""
        value = self.get(key)
        if value is not None:
            return convert(value, parse, self.at(key))
        if var and self._env.get(var):
            return convert(self._env[var], parse, f"{var} (default of {self.at(key)})")
        return self.default(key) if isinstance(default, _FieldDefault) else default

    def finish(self) -> None:
        """Refuse any key that was never read."""
        reject_unknown_keys(self.raw, tuple(self._read), self.path)


# --------------------------------------------------------------------------- converters


def boolean(value: object) -> bool:
    """``true``/``false``, also as the strings that ``${VAR}`` expansion yields."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"must be true or false, got {value!r}")


def positive_int(value: object) -> int:
    """A whole number of at least 1 (``8`` or ``"8"``)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise ValueError(f"must be at least 1, got {number}")
    return number


def choice(*options: str) -> Callable[[Any], str]:
    """One of ``options`` (lower-case), whatever the case it is written in."""

    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            hint = did_you_mean(text, options)
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}{hint}")
        return text

    return parse


def string_list(
    value: object, *, allow_empty: bool = True, numbers: bool = False
) -> tuple[str, ...]:
    """A string or a list of strings (with ``numbers``, numbers are taken as their text)."""
    items = value if isinstance(value, list | tuple) else [value]
    if not items and not allow_empty:
        raise ValueError("must not be an empty list")
    allowed = (str, int) if numbers else (str,)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, allowed):
            raise ValueError(f"expected a string or a list of strings, got {describe(item)}")
    return tuple(str(item) for item in items)


def networks(value: object, *, allow_empty: bool = True) -> tuple[IPNetwork, ...]:
    """Networks (CIDR) or addresses: a list, or one string with commas between them."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(
            f"expected networks such as 10.0.0.0/8, as a list or separated by commas,"
            f" got {describe(value)}"
        )
    if not items and not allow_empty:
        raise ValueError("must not be an empty list")
    parsed = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"invalid network {item!r}: expected a string such as 10.0.0.0/8")
        try:
            parsed.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as error:
            raise ValueError(f"invalid network {item.strip()!r}: {error}") from None
    return tuple(parsed)


def path_in(base_dir: Path | None) -> Callable[[Any], Path]:
    """A file path; ``~`` expands and a relative one is taken from ``base_dir``."""

    def parse(value: Any) -> Path:
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return path

    return parse
