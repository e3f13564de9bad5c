"""Is a client address in a list of networks? One answer for access control and for rules."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def network_of(ip: str, networks: Iterable[IPNetwork]) -> IPNetwork | None:
    """The first of ``networks`` that holds ``ip``, or None (also for a string that is no address).

    An IPv4-mapped IPv6 address (``::ffff:10.1.2.3``, what a dual-stack socket reports for an
    IPv4 client) is in a network that holds either spelling, and a zone index (``%eth0``) is
    ignored.
    """
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    for network in networks:
        if any(candidate in network for candidate in candidates):
            return network
    return None
