"""Exceptions shared across modules; each carries a message fit to show a user as is.

The tree, as httpx writes it down in ``_exceptions.py``::

    RelayError                      every error the relay raises on purpose
    ├── ConfigError                 invalid configuration; ``path`` names the key (relay.errors)
    ├── SpoolError                  the spool cannot store, read or open (relay.errors)
    ├── StartupError                port taken, spool locked, bad certificate (relay.app)
    ├── CLIError                    a command-line mistake, shown as one line (relay.cli)
    └── UpstreamError               the upstream connection, not one message (relay.upstream)
        ├── UpstreamUnavailable     cannot connect, TLS missing, connection lost: retry later
        ├── UpstreamAuthError       credentials refused (535): a configuration problem
        └── UpstreamOutcomeUnknown  no reply to the final dot: Infobip may have the message

    AddressError(ValueError)        a MAIL/RCPT path refused, with its SMTP reply (relay.address)
    InvalidAddress(ValueError)      a spooled address that cannot go upstream (relay.upstream)

The CLI turns any RelayError into one line on stderr and a non-zero exit; the listener turns
everything else into ``451 4.3.0`` without a traceback to the client.
"""

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
