"""Shared fixtures. Sections: TLS material, fake Infobip upstream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from fakeupstream import DEFAULT_API_KEY, FakeUpstream, FakeUpstreamFactory, TlsMode
from relayrunner import ProcessRelay, ThreadRelay, relay_config, write_config
from util import free_port

__all__ = ["free_port"]


# ---------------------------------------------------------------------------------------------
# TLS material (one test CA per session)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """The test CA that signs every server certificate (fake upstream and relay listener)."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem_path(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEM file with the test CA certificate (give it to the relay as ``ca_file``)."""
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    """Leaf certificate for ``localhost`` and ``127.0.0.1`` (``.configure_cert(ctx)``)."""
    return tls_ca.issue_cert("localhost", "127.0.0.1")


@pytest.fixture(scope="session")
def listener_cert_files(
    server_cert: trustme.LeafCert, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """``(cert_path, key_path)`` PEM files of ``server_cert`` for the relay's listener."""
    directory = tmp_path_factory.mktemp("listener-tls")
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    server_cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)
    return cert_path, key_path


# ---------------------------------------------------------------------------------------------
# Fake Infobip upstream
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_upstream_factory(
    tls_ca: trustme.CA, ca_pem_path: Path, server_cert: trustme.LeafCert
) -> Iterator[FakeUpstreamFactory]:
    """``factory(tls="starttls", api_key="test-api-key", **options)`` -> started FakeUpstream.

    Every fake made is stopped at teardown.
    """
    made: list[FakeUpstream] = []

    def factory(
        tls: TlsMode = "starttls", api_key: str = DEFAULT_API_KEY, **options: Any
    ) -> FakeUpstream:
        options.setdefault("ca", tls_ca)
        options.setdefault("ca_pem_path", ca_pem_path)
        options.setdefault("cert", server_cert)
        fake = FakeUpstream(tls, api_key, **options)
        made.append(fake)
        return fake.start()

    yield factory
    for fake in made:
        fake.close()


@pytest.fixture
def fake_upstream(fake_upstream_factory: FakeUpstreamFactory) -> FakeUpstream:
    """A started STARTTLS fake upstream (API key ``test-api-key``)."""
    return fake_upstream_factory()


# ---------------------------------------------------------------------------------------------
# The relay under test
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., ThreadRelay]]:
    """``start_relay(upstream, **overrides)`` -> a running in-process relay, stopped at teardown.

    ``overrides`` replace or merge into config sections (``queue={"max_age": "1s"}``).
    """
    running: list[ThreadRelay] = []

    def start(fake: FakeUpstream | None, /, **overrides: Any) -> ThreadRelay:
        config = relay_config(tmp_path, fake, **overrides)
        relay = ThreadRelay(write_config(tmp_path, config)).start()
        running.append(relay)
        return relay

    yield start
    for relay in running:
        relay.stop()


@pytest.fixture
def start_relay_process(tmp_path: Path) -> Iterator[Callable[..., ProcessRelay]]:
    """``start_relay_process(config_dict)`` -> `infobip-relay serve` child process."""
    running: list[ProcessRelay] = []

    def start(config: dict[str, Any]) -> ProcessRelay:
        relay = ProcessRelay(write_config(tmp_path, config), tmp_path / "relay.log").start()
        running.append(relay)
        return relay

    yield start
    for relay in running:
        relay.ensure_stopped()
