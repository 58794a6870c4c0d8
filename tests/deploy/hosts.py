"""Separate hosts on one machine: a Linux network namespace per host, each joined by a veth pair to
one bridge in a private /24 that no route of the machine covers, the bridge itself holding the
first address so that the test process (in the root namespace) reaches every host directly.

Nothing is routed anywhere else: the hosts have only their link's own route (no default route, no
NAT), so their traffic stays on the test addresses. Every name carries a random tag, so runs never
clash; ``close`` removes the namespaces (their veth ends go with them) and the bridge.

Needs root and ``ip`` (iproute2); ``available`` says why not otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
from contextlib import suppress
from dataclasses import dataclass, field

SUBNET_PREFIX = "10.213"
"""The test subnets are 10.213.x.0/24, x chosen free at random."""


def ip(*args: str, check: bool = True) -> str:
    """Runs ``ip <args>`` and returns its output; raises with ip's own message when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def available() -> str | None:
    """None when namespaces can be made here; otherwise why not (the reason a test is skipped for)."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"portal-probe-{secrets.token_hex(3)}"
    try:
        ip("netns", "list")
        ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` is not usable here: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine routes to or has an address in (the default route aside)."""
    taken = []
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            with suppress(ValueError):
                taken.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(ip("-j", "-4", "addr") or "[]"):
        for info in link.get("addr_info", []):
            taken.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    return taken


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.x.0/24 that overlaps nothing the machine routes or is addressed in."""
    taken = _taken_networks()
    for x in random.sample(range(1, 255), 254):
        candidate = ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{x}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise RuntimeError(f"every {SUBNET_PREFIX}.x.0/24 is in use on this machine")


@dataclass
class Host:
    """One machine of the test: its network namespace, its address, and the end of its cable
    that is plugged into the bridge (set down: the cable is pulled)."""

    role: str
    netns: str
    address: str
    link: str
    """Its veth end on the bridge, in the root namespace."""

    @property
    def launcher(self) -> list[str]:
        """Prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.netns]

    def routes(self) -> list[str]:
        """This host's IPv4 routes (its main routing table), one line each."""
        return [line for line in ip("-n", self.netns, "-4", "route", "show").splitlines() if line]


@dataclass
class Network:
    """The bridge and the hosts plugged into it, all named ``*<tag>*``."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3)[:5])
    subnet: ipaddress.IPv4Network = field(default_factory=free_subnet)
    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""

    def __post_init__(self) -> None:
        # Interface names are at most 15 characters: "br-portal-" and the 5-character tag.
        self.bridge = f"br-portal-{self.tag}"

    @property
    def gateway(self) -> str:
        """The bridge's address: where the test process is, seen from the hosts."""
        return str(self.subnet.network_address + 1)

    def up(self) -> Network:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, role: str) -> Host:
        """A new namespace ``portal-<tag>-<role>`` with ``eth0`` on the bridge and the subnet's next
        address; ``role``: up to 3 characters (it goes into interface names)."""
        assert len(role) <= 3, role
        netns = f"portal-{self.tag}-{role}"
        address = str(self.subnet.network_address + 2 + len(self.hosts))
        outside, inside = f"vp{self.tag}{role}", f"np{self.tag}{role}"
        ip("netns", "add", netns)
        host = Host(role, netns, address, outside)
        self.hosts[role] = host  # from here on, close() removes it
        ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns)
        ip("link", "set", outside, "master", self.bridge, "up")
        ip("-n", netns, "link", "set", inside, "name", "eth0")
        ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        return host

    def cut(self, host: Host) -> None:
        """Pulls the host's cable at the bridge: its packets are lost silently, both ways, and
        its open connections hang rather than fail (the host sees no carrier)."""
        ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def close(self) -> None:
        """Removes every namespace (its veth pair goes with it) and the bridge; best effort, so
        that one failure leaves nothing else behind."""
        for host in self.hosts.values():
            ip("netns", "del", host.netns, check=False)
            ip("link", "del", host.link, check=False)
        ip("link", "del", self.bridge, check=False)
