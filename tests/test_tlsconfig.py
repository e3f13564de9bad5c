"""relay.tlsconfig: the one loader of listener certificates, and the swap on reload."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from relayrunner import relay_config, write_config

from relay.config import load_config
from relay.errors import ConfigError
from relay.tlsconfig import adopt_certificates, listener_contexts, server_context


def test_server_context_is_tls12_or_later(listener_cert_files: tuple[Path, Path]) -> None:
    context = server_context(*listener_cert_files)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_listener_contexts_name_the_listener_that_fails(
        tmp_path: Path, listener_cert_files: tuple[Path, Path]) -> None:
    cert, key = listener_cert_files
    copy = tmp_path / "cert.pem"
    copy.write_bytes(cert.read_bytes())
    listeners = [{"name": "plain", "address": "127.0.0.1", "port": 2525},
                 {"name": "tls", "address": "127.0.0.1", "port": 4650, "tls": "implicit",
                  "certificate": str(copy), "private_key": str(key)}]
    config = load_config(write_config(tmp_path, relay_config(tmp_path, None,
                                                             listeners=listeners)))
    assert list(listener_contexts(config)) == ["tls"]
    copy.write_text("not a certificate", encoding="ascii")  # replaced badly before a reload
    with pytest.raises(ConfigError, match=r"^listeners\[1\]\.certificate: cannot load: "):
        listener_contexts(config)


def test_adopt_certificates_loads_into_the_context_in_use(
        tmp_path: Path, listener_cert_files: tuple[Path, Path], tls_ca: trustme.CA) -> None:
    cert, key = listener_cert_files
    listener = {"name": "tls", "address": "127.0.0.1", "port": 4650, "tls": "implicit",
                "certificate": str(cert), "private_key": str(key)}
    config = load_config(write_config(tmp_path, relay_config(tmp_path, None,
                                                             listeners=[listener])))
    current = listener_contexts(config)
    fresh = listener_contexts(config)
    adopted = adopt_certificates(current, fresh, config)
    # An implicit-TLS server keeps the context it was created with: the same object goes on.
    assert adopted["tls"] is current["tls"]
    assert adopt_certificates({}, fresh, config)["tls"] is fresh["tls"]  # a new listener
