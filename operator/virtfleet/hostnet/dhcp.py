"""One dnsmasq per network and node, each in a network namespace of its own.

Why a namespace: the server answers on the network's ``dhcpAddress``, which is the same
on every node; in the node's own namespace that address would be the node's, reachable
from the VMs. In a namespace whose only interface is ``eth0`` (the peer of the bridge
port ``vfdh<vni>``), dnsmasq sees the segment and nothing else.

How: ``unshare --net -- dnsmasq --keep-in-foreground ...`` in a new session (so an agent
restart neither signals nor orphans it into death: it keeps serving the VMs), then the
veth is made with its peer directly in the process's namespace and configured there.
The namespace has no name: it lives exactly as long as dnsmasq, and its veth with it.
dnsmasq is found again (after an agent restart too) by its pid file, trusted only when
``/proc/<pid>/cmdline`` is dnsmasq with our config file. State per VNI in the state
dir: ``vfdh<vni>.conf``, ``.hosts``, ``.pid``, ``.log``, and ``.loaded`` (the
fingerprint of the hosts file dnsmasq last read: written after the SIGHUP, so a crash
in between reloads again).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from virtfleet.hostnet.errors import HostNetworkError
from virtfleet.hostnet.gateway import plug_in_gateway, set_gateway_mac
from virtfleet.hostnet.links import NO_LINK_LOCAL, delete_link
from virtfleet.hostnet.netns import iproute
from virtfleet.logs import get_logger
from virtfleet.netmodel import (
    DHCP_PORT_PREFIX,
    ObservedDhcp,
    PlugGateway,
    ReloadDhcp,
    StartDhcp,
    dhcp_port_name,
    gateway_port_name,
    read_fingerprint,
    vni_of,
)

_log = get_logger("virtfleet.hostnet.dhcp")

_START_TIMEOUT_S: Final = 5.0
_STOP_TIMEOUT_S: Final = 5.0
_POLL_S: Final = 0.02
_SBIN: Final = "/usr/sbin:/sbin:/usr/bin:/bin"


@dataclass(frozen=True)
class DhcpFiles:
    config: Path
    hosts: Path
    pid: Path
    log: Path
    loaded: Path

    @classmethod
    def of(cls, state_dir: Path, vni: int) -> DhcpFiles:
        base = state_dir / dhcp_port_name(vni)
        return cls(*(base.with_suffix(s) for s in (".conf", ".hosts", ".pid", ".log", ".loaded")))

    def all(self) -> tuple[Path, ...]:
        return (self.config, self.hosts, self.pid, self.log, self.loaded)


class DhcpServers:
    """The node's dnsmasq processes: observe, start, reload, stop."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        #: Processes this agent started: waited for, so none lingers as a zombie.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def observe(self) -> dict[int, ObservedDhcp]:
        """Every network with DHCP state here, running or not."""
        self._reap()
        found: dict[int, ObservedDhcp] = {}
        if not self.state_dir.is_dir():
            return found
        for config in sorted(self.state_dir.glob(f"{DHCP_PORT_PREFIX}*.conf")):
            vni = vni_of(config.stem)
            if vni is None:
                continue
            files = DhcpFiles.of(self.state_dir, vni)
            found[vni] = ObservedDhcp(
                vni=vni,
                pid=self.running_pid(files),
                config_fingerprint=read_fingerprint(_read(config)),
                hosts_fingerprint=_read(files.loaded).strip() or None,
            )
        return found

    def start(self, ipr: Any, action: StartDhcp) -> int:
        """Start the network's dnsmasq (stopping one still running) and plug it in."""
        files = DhcpFiles.of(self.state_dir, action.vni)
        self.stop(ipr, action.vni, remove_state=False)
        self._prepare_dir()
        _write(files.config, action.config)
        _write(files.hosts, action.hosts)
        for stale in (files.pid, files.loaded):
            stale.unlink(missing_ok=True)
        command = [
            _binary("unshare"),
            "--net",
            "--",
            _binary("dnsmasq"),
            "--keep-in-foreground",
            f"--conf-file={files.config}",
            f"--pid-file={files.pid}",
            f"--dhcp-hostsfile={files.hosts}",
        ]
        with files.log.open("wb") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._children[proc.pid] = proc
        try:
            self._wait_started(proc, files)
            _plug_in(ipr, proc.pid, action)
        except BaseException:
            self._terminate(proc.pid)
            raise
        _write(files.loaded, action.hosts_fingerprint)
        _log.info("DHCP server started", vni=action.vni, pid=proc.pid, network=action.network)
        return proc.pid

    def gateway(self, ipr: Any, action: PlugGateway) -> None:
        """The network's NAT gateway in its running dnsmasq's namespace."""
        pid = self.running_pid(DhcpFiles.of(self.state_dir, action.vni))
        if pid is None:
            raise HostNetworkError(
                f"no DHCP namespace runs for VNI {action.vni} to hold its gateway"
            )
        plug_in_gateway(ipr, pid, action)

    def reload(self, action: ReloadDhcp) -> None:
        """New leases: rewrite the hosts file and SIGHUP (which re-reads just that)."""
        files = DhcpFiles.of(self.state_dir, action.vni)
        pid = self.running_pid(files)
        if pid is None:
            raise HostNetworkError(f"no DHCP server runs for VNI {action.vni} to reload")
        _write(files.hosts, action.hosts)
        os.kill(pid, signal.SIGHUP)
        _write(files.loaded, action.hosts_fingerprint)

    def stop(self, ipr: Any, vni: int, *, remove_state: bool) -> None:
        """Stop the network's dnsmasq if it runs; delete its port (and its files)."""
        files = DhcpFiles.of(self.state_dir, vni)
        pid = self.running_pid(files)
        if pid is not None:
            self._terminate(pid)
            _log.info("DHCP server stopped", vni=vni, pid=pid)
        # The namespace (and the veths in it) is freed asynchronously after dnsmasq exits.
        delete_link(ipr, dhcp_port_name(vni))
        delete_link(ipr, gateway_port_name(vni))
        if remove_state:
            for path in files.all():
                path.unlink(missing_ok=True)

    def running_pid(self, files: DhcpFiles) -> int | None:
        """The pid in the pid file, if that process is our dnsmasq and alive."""
        text = _read(files.pid).strip()
        if not text.isdigit():
            return None
        pid = int(text)
        return pid if _is_our_dnsmasq(pid, files) else None

    def _terminate(self, pid: int) -> None:
        """SIGTERM, and SIGKILL if it is still there after the timeout."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                _log.info("DHCP server already gone", pid=pid)
                break
            if self._wait_gone(pid, _STOP_TIMEOUT_S):
                break
            _log.warning("DHCP server ignored SIGTERM; killing it", pid=pid)
        self._children.pop(pid, None)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        child = self._children.get(pid)
        if child is not None:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):  # its parent (init, after an agent restart) reaps it
                return True
            time.sleep(_POLL_S)
        return False

    def _wait_started(self, proc: subprocess.Popen[bytes], files: DhcpFiles) -> None:
        """Until dnsmasq wrote its pid file: it runs, in its own namespace, as ``pid``."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise HostNetworkError(f"dnsmasq exited with {proc.returncode}: {_tail(files.log)}")
            if _read(files.pid).strip() == str(proc.pid):
                if _netns_inode(proc.pid) == _netns_inode(os.getpid()):
                    raise HostNetworkError("dnsmasq runs in the agent's network namespace")
                return
            time.sleep(_POLL_S)
        raise HostNetworkError(f"dnsmasq did not start in {_START_TIMEOUT_S}s: {_tail(files.log)}")

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                _log.warning("DHCP server exited", pid=pid, code=proc.returncode)
                del self._children[pid]

    def _prepare_dir(self) -> None:
        """dnsmasq re-reads the hosts file as ``nobody``: the way there must be open."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)
        for folder in (self.state_dir, *self.state_dir.parents):
            if not folder.stat().st_mode & stat.S_IXOTH:
                _log.warning(
                    "dnsmasq (user nobody) cannot reach its hosts file: leases will not "
                    "reload until the folder is world-searchable",
                    folder=str(folder),
                )
                break


def _plug_in(ipr: Any, pid: int, action: StartDhcp) -> None:
    """The veth, its peer born as ``eth0`` in dnsmasq's namespace, addressed and up."""
    port = dhcp_port_name(action.vni)
    delete_link(ipr, port)  # of a predecessor whose namespace is still being freed
    netns = f"/proc/{pid}/ns/net"
    fd = os.open(netns, os.O_RDONLY)
    try:
        peer = {"ifname": "eth0", "net_ns_fd": fd, "mtu": action.mtu}
        ipr.link("add", ifname=port, kind="veth", mtu=action.mtu, peer=peer)
    finally:
        os.close(fd)
    index = ipr.link_lookup(ifname=port)[0]
    ipr.link("set", index=index, IFLA_AF_SPEC=NO_LINK_LOCAL)
    with iproute(netns) as inside:
        inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
        eth0 = inside.link_lookup(ifname="eth0")[0]
        inside.link("set", index=eth0, IFLA_AF_SPEC=NO_LINK_LOCAL)
        if action.nat is not None:
            set_gateway_mac(inside, eth0, action.vni)
        inside.addr("add", index=eth0, address=action.address, prefixlen=action.prefix_length)
        inside.link("set", index=eth0, state="up")


def _is_our_dnsmasq(pid: int, files: DhcpFiles) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone (a zombie reads as empty, and fails below)
    return (
        bool(argv)
        and os.path.basename(argv[0]) == b"dnsmasq"
        and f"--conf-file={files.config}".encode() in argv
    )


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def _netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=_SBIN)
    if path is None:
        package = "dnsmasq-base" if name == "dnsmasq" else "util-linux"
        raise HostNetworkError(f"{name} is not installed (Debian package {package})")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _write(path: Path, text: str) -> None:
    """Atomically, readable by dnsmasq after it dropped root."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.chmod(0o644)
    temporary.replace(path)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace").strip()[-500:] or "(no output)"
    except OSError as exc:
        return f"(its log is unreadable: {exc})"
