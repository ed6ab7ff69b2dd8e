"""Network namespaces of the kubelet nodes, and the TCP forwarder that joins them to loopback.

Why: a kubelet node's containerd, kubelet and pods live in a network namespace the harness
makes (``vf-<node>``), so that the pods' CNI bridge, the node's addresses and its pods'
addresses exist only inside it and nothing there has a route off the machine. The
control plane and the libvirtds stay on the machine's loopback. The forwarder carries the
few TCP services across, like a minimal kube-proxy for exactly these:

- into a node's namespace: the apiserver at ``127.0.0.1:<port>`` (kubelet, hostNetwork
  agents) and at the ``kubernetes`` Service address ``10.96.0.1:443`` (pods, through their
  bridge's gateway), and each node's libvirtd port (the agents reach a migration's target).
  (A route out onto loopback, ``connect_ns`` set, would serve ``kubectl logs``: not used yet.)

A socket keeps the namespace it was made in: the forwarder enters a namespace just long
enough to create a socket there (``setns`` on this thread), then returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> Path:
    """Where ``ip netns add`` keeps a namespace (in the machine's mount namespace)."""
    return Path("/run/netns") / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def create(name: str) -> None:
    """``ip netns add NAME`` with loopback up (idempotent)."""
    if not exists(name):
        subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


def delete(name: str) -> None:
    if exists(name):
        subprocess.run(["ip", "netns", "delete", name], check=False)


def add_local_address(name: str, cidr: str) -> None:
    """An address of the namespace itself (on ``lo``), e.g. the Service address."""
    shown = subprocess.run(
        ["ip", "-n", name, "-o", "addr", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if f" {cidr} " not in shown:
        subprocess.run(["ip", "-n", name, "addr", "add", cidr, "dev", "lo"], check=True)


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """This thread in namespace ``name`` (None: stay) for the block, then back."""
    if name is None:
        yield
        return
    with open("/proc/thread-self/ns/net", "rb") as home, open(netns_path(name), "rb") as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass(frozen=True)
class Route:
    """Accept on ``listen`` in namespace ``listen_ns``; connect to ``connect`` in ``connect_ns``."""

    listen_ns: str | None
    listen: str
    connect_ns: str | None
    connect: str

    @staticmethod
    def split(address: str) -> tuple[str, int]:
        host, _, port = address.rpartition(":")
        return host, int(port)


def _listening_socket(route: Route) -> socket.socket:
    with entered(route.listen_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(Route.split(route.listen))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass  # the other side went away: close ours too
    finally:
        with contextlib.suppress(OSError):
            writer.close()


def _handler(
    route: Route,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with entered(route.connect_ns):
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(upstream, Route.split(route.connect))
        except OSError as exc:
            print(f"forward {route.listen} -> {route.connect}: {exc}", file=sys.stderr)
            upstream.close()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return handle


async def serve(routes: list[Route]) -> None:
    servers = [
        await asyncio.start_server(_handler(route), sock=_listening_socket(route))
        for route in routes
    ]
    print(f"forwarding {len(servers)} routes", file=sys.stderr, flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def spec_json(routes: list[Route]) -> str:
    return json.dumps([asdict(route) for route in routes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="JSON list of routes (see Route)")
    args = parser.parse_args()
    routes = [Route(**item) for item in json.loads(args.spec)]
    asyncio.run(serve(routes))


if __name__ == "__main__":
    main()
