"""The names and addresses this machine answers to: the Host values a wildcard bind accepts.

A server bound to ``0.0.0.0`` or ``::`` is meant to be reached from other machines, by this
machine's name or one of its addresses; those are what its clients put in the Host header. They
are read from the kernel (the host name, each interface's IPv4 address, ``/proc/net/if_inet6``),
never from DNS, so a worker's start never waits on a resolver.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from functools import cache
from pathlib import Path

#: <linux/sockios.h>: an interface's IPv4 address.
SIOCGIFADDR = 0x8915
WILDCARDS = ("", "0.0.0.0", "::", "*")


def is_wildcard(host: str) -> bool:
    """Whether a bind address's host means every interface."""
    return host.strip("[]") in WILDCARDS


@cache
def machine_names() -> frozenset[str]:
    """This machine's host name (short and as set) and every interface address, lower case."""
    names = {socket.gethostname().lower()}
    names.add(next(iter(names)).partition(".")[0])
    names.update(_ipv4_addresses())
    names.update(_ipv6_addresses())
    return frozenset(name for name in names if name)


def _ipv4_addresses() -> set[str]:
    found = set()
    try:
        interfaces = socket.if_nameindex()
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in interfaces:
            try:
                packed = fcntl.ioctl(
                    probe.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode())
                )
            except OSError:  # no IPv4 address on this interface
                continue
            found.add(socket.inet_ntoa(packed[20:24]))
    return found


def _ipv6_addresses() -> set[str]:
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.add(ipaddress.IPv6Address(int(fields[0], 16)).compressed)
    return found
