"""Exceptions shared across modules; each carries a message fit to show a user as is."""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is invalid; ``path`` names the offending key (``upstream.port``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class SpoolError(RelayError):
    """The spool could not store or update a message (disk full, I/O error, corrupt file)."""
