"""The listeners' TLS contexts: loading certificates, and swapping them in on reload.

The one place that loads a listener's certificate and key: config validation (does the pair
load?), the listeners at start, and a reload all go through `server_context`.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from relay.errors import ConfigError

if TYPE_CHECKING:
    from relay.config import Config

TLSContexts = dict[str, ssl.SSLContext]  # listener name -> context


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context: the system store plus ``ca_file``; never unverified."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def server_context(certificate: Path | str, private_key: Path | str) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later) with this certificate chain and key loaded.

    Raises OSError (FileNotFoundError) or ssl.SSLError when the pair does not load.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certificate), str(private_key))
    return context


def listener_contexts(config: Config) -> TLSContexts:
    """A fresh context for each listener with TLS; ConfigError names the one that fails."""
    contexts = {}
    for index, listener in enumerate(config.listeners):
        if listener.tls == "none":
            continue
        try:
            contexts[listener.name] = server_context(str(listener.certificate),
                                                     str(listener.private_key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"listeners[{index}].certificate", f"cannot load: {exc}") from None
    return contexts


def adopt_certificates(current: TLSContexts, fresh: TLSContexts, config: Config) -> TLSContexts:
    """Load reloaded certificates into the contexts in use.

    An implicit-TLS asyncio server keeps the context it was created with, so new certificates
    must go into that same object; `fresh` (from `listener_contexts`) was built first to prove
    the files load.
    """
    adopted = dict(fresh)
    for listener in config.listeners:
        context = current.get(listener.name)
        if context is not None and listener.name in fresh:
            context.load_cert_chain(str(listener.certificate), str(listener.private_key))
            adopted[listener.name] = context
    return adopted
