"""Is a client address in a list of networks? One answer for access control and for rules."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def network_of(ip: str, networks: Iterable[IPNetwork]) -> IPNetwork | None:
    """The first of ``networks`` that holds ``ip``, or None (also for a string that is no address).

    An IPv4-mapped IPv6 address (``::ffff:10.1.2.3``, what a dual-stack socket reports for an
    IPv4 client) is in a network that holds either spelling, and a zone index (``%eth0``) is
    ignored.
    """
    candidates = _spellings(ip)
    for network in networks:
        if any(candidate in network for candidate in candidates):
            return network
    return None


# Asked for every MAIL and rule evaluation, mostly about the same few clients: parsing the
# address cost more than the lookup. Bounded, and keyed by the string as the socket gave it.
@functools.lru_cache(maxsize=4096)
def _spellings(ip: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """``ip`` as an address, plus its IPv4 form when it is IPv4-mapped; () when no address."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address, address.ipv4_mapped
    return (address,)
