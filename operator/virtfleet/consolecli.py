"""``virtfleet console VM``: the VM's serial console in this terminal, as RBAC allows.

The VM's ``status.consoleEndpoint`` names its node agent's endpoint and the SHA-256 of
that endpoint's certificate; the client pins that certificate (the apiserver vouched for
it: only agents write VM status) and presents the kubeconfig's own credentials — its
client certificate or bearer token — which the agent has the apiserver check
(:mod:`virtfleet.agent.console`). ``Ctrl-]`` leaves, as in ``virsh console`` and
``virtctl console``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys
import termios
import tty
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import aiohttp

from virtfleet.actions import current_namespace
from virtfleet.runtime.kubeapi import KubeError

if TYPE_CHECKING:  # the client (and kopf) load when a console is asked for, not with the CLI
    import kopf

__all__ = ["add_parser", "credentials"]

#: Ctrl-]: leave the console.
ESCAPE: Final = b"\x1d"
MAX_FRAME: Final = 64 * 1024
#: The header a refusing endpoint explains itself in (the body of a refused WebSocket
#: upgrade never reaches the client).
MESSAGE_HEADER: Final = "Virtfleet-Message"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    console = sub.add_parser(
        "console",
        help="attach to a VM's serial console (Ctrl-] leaves; needs get on "
        "virtualmachines/console)",
    )
    console.add_argument("vm", metavar="VM", help="the VirtualMachine's name")
    console.add_argument("-n", "--namespace", help="the VM's namespace (default: kubectl's)")
    console.set_defaults(func=_cmd_console)


def _cmd_console(args: argparse.Namespace) -> int:
    namespace = args.namespace or current_namespace()
    try:
        return asyncio.run(attach(args.vm, namespace))
    except ConsoleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


class ConsoleError(Exception):
    """What the user reads when there is no console session."""


def credentials(info: kopf.ConnectionInfo) -> tuple[dict[str, str], ssl.SSLContext]:
    """The kubeconfig's bearer token (a header) and client certificate (in the context);
    the context does not verify the server: the caller pins its certificate instead."""
    context = info.as_ssl_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if info.certificate_path or info.certificate_data:
        # A certificate proves who we are without handing the node a secret: no token.
        return {}, context
    return info.as_http_headers(), context


async def endpoint_of(namespace: str, vm: str, info: kopf.ConnectionInfo) -> tuple[str, str]:
    """(URL, certificate SHA-256) from the VM's status."""
    from virtfleet.runtime.kube import KubeClient

    kube = KubeClient(info, max_workers=1)
    try:
        obj = await kube.get("VirtualMachine", namespace, vm)
    except KubeError as exc:
        raise ConsoleError(str(exc)) from exc
    finally:
        await kube.close()
    status = obj.get("status") or {}
    endpoint = status.get("consoleEndpoint") or {}
    if not endpoint.get("url") or not endpoint.get("certificateSHA256"):
        where = status.get("nodeName")
        raise ConsoleError(
            f"VirtualMachine {namespace}/{vm} has no console endpoint"
            + (f": the agent on node {where} serves none" if where else ": it is not placed")
        )
    return str(endpoint["url"]), str(endpoint["certificateSHA256"])


async def attach(vm: str, namespace: str) -> int:
    from virtfleet.runtime.credentials import load_connection

    info = load_connection()
    url, sha256 = await endpoint_of(namespace, vm, info)
    headers, context = credentials(info)
    pinned = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(sha256)))
    async with aiohttp.ClientSession(connector=pinned) as session:
        try:
            ws = await session.ws_connect(
                url, headers=headers, ssl=context, heartbeat=30.0, max_msg_size=MAX_FRAME
            )
        except aiohttp.WSServerHandshakeError as exc:
            said = exc.headers.get(MESSAGE_HEADER) if exc.headers else None
            raise ConsoleError(said or f"{url}: HTTP {exc.status}") from exc
        except aiohttp.ServerFingerprintMismatch as exc:
            raise ConsoleError(
                f"{url}: the endpoint's certificate is not the one the VM's status names "
                "(the agent restarted? try again)"
            ) from exc
        except aiohttp.ClientError as exc:
            raise ConsoleError(f"{url}: {exc}") from exc
        async with ws:
            sys.stderr.write(
                f"Connected to VirtualMachine {namespace}/{vm} (escape character is ^])\r\n"
            )
            sys.stderr.flush()
            try:
                ended_by_user = await _interact(ws, sys.stdin.fileno(), sys.stdout.fileno())
            except asyncio.CancelledError:  # SIGTERM or SIGHUP: the terminal is restored
                sys.stderr.write("\r\nConsole left (signal).\r\n")
                return 1
        if not ended_by_user:
            sys.stderr.write("\r\nConsole closed by the VM's node.\r\n")
    return 0


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Keys go to the guest as typed (no echo, no line editing, Ctrl-C included)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _interact(ws: aiohttp.ClientWebSocketResponse, stdin: int, stdout: int) -> bool:
    """Relay until the user leaves (True) or the session ends (False)."""
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(stdin, 1024)
        except OSError:
            data = b""  # the terminal went away: as end of input
        if not data:
            loop.remove_reader(stdin)
        keys.put_nowait(data)

    loop.add_reader(stdin, readable)
    # A signal cancels this task, so the terminal leaves raw mode on the way out.
    this = asyncio.current_task()
    assert this is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, this.cancel)

    async def keyboard() -> bool:
        while data := await keys.get():
            before, escape, _ = data.partition(ESCAPE)
            if before:
                await ws.send_bytes(before)
            if escape:
                return True
        return True  # end of input (not a terminal): done

    async def screen() -> bool:
        async for message in ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                os.write(stdout, message.data)
            elif message.type is aiohttp.WSMsgType.ERROR:
                break
        return False

    tasks = [asyncio.create_task(keyboard()), asyncio.create_task(screen())]
    try:
        with _raw(stdin):
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(stdin)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return any(task.result() for task in done if not task.cancelled() and not task.exception())
