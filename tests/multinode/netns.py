"""Network namespaces as "nodes" on one machine, joined by a bridge: what the multi-node tests run on.

A switch namespace holds a bridge; each node is a namespace with one veth into it and a private address
(``10.77.0.x/24``) that exists only inside these namespaces. The tests create and remove every namespace
themselves (names carry a random tag, so two runs never meet) and nothing outside them is ever contacted.
A node's link can be cut and healed (the veth's bridge end goes down and up), which is a partition of that
node from all others. ``inside(ns)`` moves the calling thread into a namespace (``setns``): the test's own
clients then talk to the nodes like any other machine on that network.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
import threading
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def available() -> str | None:
    """None if this process can create network namespaces, else why not (the tests skip, loudly)."""
    name = f"ws-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except FileNotFoundError:
        return "iproute2's `ip` is not installed"
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed (root or CAP_SYS_ADMIN needed): {exc.stderr.strip()}"
    try:
        _ip("netns", "del", name)
    except subprocess.CalledProcessError:
        pass  # the probe namespace is gone already: creating one worked, which is what was asked
    return None


@dataclass(frozen=True)
class Node:
    name: str
    ns: str
    ip: str
    port: str  # the veth's end on the bridge, in the switch namespace

    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this node."""
        return ["ip", "netns", "exec", self.ns]


@dataclass
class Network:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self):
        self.switch = f"ws-{self.tag}-sw"
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str) -> Node:
        """A node with the next address on the bridge."""
        host = 10 + len(self.nodes)
        node = Node(name, f"ws-{self.tag}-{name}", f"{SUBNET}.{host}", f"v{host}")
        _ip("netns", "add", node.ns)
        _ip("-n", self.switch, "link", "add", node.port, "type", "veth", "peer", "name", "eth0", "netns", node.ns)
        _ip("-n", self.switch, "link", "set", node.port, "master", "br0")
        _ip("-n", self.switch, "link", "set", node.port, "up")
        _ip("-n", node.ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _ip("-n", node.ns, "link", "set", "eth0", "up")
        _ip("-n", node.ns, "link", "set", "lo", "up")
        self.nodes[name] = node
        return node

    def cut(self, name: str) -> None:
        """Partition ``name`` from every other node (its packets go nowhere; its processes run on)."""
        _ip("-n", self.switch, "link", "set", self.nodes[name].port, "down")

    def heal(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self.nodes[name].port, "up")

    def remove(self) -> None:
        """Delete every namespace (their veths go with them)."""
        for ns in [n.ns for n in self.nodes.values()] + [self.switch]:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)
        self.nodes.clear()


_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(ns: str):
    """Run the calling thread's network I/O in namespace ``ns`` until the block ends (threads started inside
    inherit it)."""
    here = f"/proc/self/task/{threading.get_native_id()}/ns/net"  # this thread's namespace
    original = os.open(here, os.O_RDONLY)
    try:
        _setns(f"/var/run/netns/{ns}")
        yield
    finally:
        try:
            if _libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the original network namespace")
        finally:
            os.close(original)
