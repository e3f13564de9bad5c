"""A listener behind a proxy: accept, check the peer, read its PROXY header, then serve SMTP.

Stands in for ``loop.create_server`` on listeners with ``proxy_protocol: true``. The header
has to be read before the SMTP session exists (its per-client limit and trust need the client
address) and, on an implicit-TLS listener, before the TLS handshake. A protocol handed the
connection by create_server would already have read the octets after the header (the TLS
ClientHello), so this accepts sockets itself, takes exactly the header off each one
(relay.proxyproto.read_header) and only then gives the socket to the event loop, with TLS.

Only peers in ``access.trusted_proxies`` are served: any other connection is closed before a
single octet is read, so nobody else can claim an address. A trusted proxy that sends no
header, or a malformed one, within the time limit is closed as well. Each closure is one log
line; nothing is answered, since the other end is a proxy and not an SMTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

from relay.config import ListenerConfig
from relay.listener import ListenerState, session_factory
from relay.proxyproto import HEADER_TIMEOUT, ProxyHeader, ProxyHeaderError, read_header

log = logging.getLogger("relay.listener")

# Out of descriptors or memory: accepting again at once would spin (asyncio pauses too).
_ACCEPT_PAUSE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ProxyListener:
    """The listening sockets of one proxy_protocol listener, with asyncio.Server's shutdown API."""

    def __init__(self, listener: ListenerConfig, state: ListenerState,
                 sockets: list[socket.socket]) -> None:
        self.listener = listener
        self.state = state
        self._sockets = sockets
        self._new_session = session_factory(listener, state)
        self._accepting: list[asyncio.Task[None]] = []
        # Connections whose header is still being read: bounded by access.max_connections.
        self._pending: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, listener: ListenerConfig, state: ListenerState, *,
                    reuse_port: bool) -> ProxyListener:
        """Bind and listen (OSError when the address cannot be bound), then accept."""
        server = cls(listener, state, _bind(listener.address, listener.port, reuse_port))
        loop = asyncio.get_running_loop()
        server._accepting = [loop.create_task(server._accept(sock)) for sock in server._sockets]
        return server

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def close(self) -> None:
        for task in (*self._accepting, *self._pending):
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, *self._pending, return_exceptions=True)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    conn, peer = await loop.sock_accept(sock)
                except OSError as exc:
                    if exc.errno in _ACCEPT_PAUSE_ERRORS:
                        log.error("listener %s cannot accept connections: %s; pausing 1 s",
                                  self.listener.name, exc)
                        await asyncio.sleep(1)
                    continue  # ECONNABORTED and the like concern one client only
                self._start_session(conn, str(peer[0]))
        finally:
            sock.close()

    def _start_session(self, conn: socket.socket, peer: str) -> None:
        conn.setblocking(False)
        if len(self._pending) + len(self.state.connections) >= \
                self.state.config.access.max_connections:
            self._close(conn, "too_many_connections",
                        "closed a connection from proxy %s: too many connections", peer)
            return
        task = asyncio.get_running_loop().create_task(self._serve(conn, peer))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        handed_over = False
        try:
            header = await self._header(conn, peer)
            if header is not None:
                handed_over = await self._hand_over(conn, peer, header)
        finally:
            if not handed_over:
                conn.close()

    async def _header(self, conn: socket.socket, peer: str) -> ProxyHeader | None:
        if not self.state.config.access.is_trusted_proxy(peer):
            self._close(conn, "proxy_untrusted",
                        "closed a connection from %s: not in access.trusted_proxies (a "
                        "proxy_protocol listener serves only its proxies)", peer)
            return None
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                return await read_header(conn)
        except TimeoutError:
            self._close(conn, "proxy_header", "closed a connection from proxy %s: no complete "
                        "PROXY header within %g s", peer, HEADER_TIMEOUT)
        except ProxyHeaderError as exc:
            self._close(conn, "proxy_header", "closed a connection from proxy %s: %s", peer, exc)
        except OSError as exc:
            self._close(conn, "proxy_header", "closed a connection from proxy %s while reading "
                        "its PROXY header: %s", peer, exc)
        return None

    async def _hand_over(self, conn: socket.socket, peer: str, header: ProxyHeader) -> bool:
        """Start the SMTP session (after the TLS handshake, on implicit TLS) for the client."""
        # LOCAL is the proxy's own health check; UNKNOWN means the proxy could not say who the
        # client is, and the spec then says to use the connection's own endpoints.
        client = header.source[0] if header.source is not None else peer
        counted = header.kind != "local"
        log.debug("listener %s: PROXY v%d %s from %s, client %s", self.listener.name,
                  header.version, header.kind, peer, client)
        tls = self.state.tls_contexts.get(self.listener.name) \
            if self.listener.tls == "implicit" else None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self._new_session(client, counted), conn, ssl=tls)
        except OSError as exc:  # a failed TLS handshake (ssl.SSLError) or a reset
            log.info("listener %s: connection from %s (via proxy %s) failed before SMTP: %s",
                     self.listener.name, client, peer, exc)
            return False
        return True

    def _close(self, conn: socket.socket, reason: str, message: str, *args: object) -> None:
        self.state.metrics.rejected.labels(listener=self.listener.name, reason=reason).inc()
        log.warning("listener %s: " + message, self.listener.name, *args)
        with contextlib.suppress(OSError):
            conn.close()


def _bind(address: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets as loop.create_server makes them (one per address ``address`` names)."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, where in socket.getaddrinfo(
                address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(where)
            sock.listen(1024)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
