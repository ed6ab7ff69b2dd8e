"""Two (or more) real libvirt "nodes" on one machine, for end-to-end tests.

Why: the operator's interesting behaviour (placement, live migration with and without
storage copy, per-node agents) needs several libvirt hosts, and the test machines are
single VMs without nested KVM. Each node here is a ``libvirtd`` + ``virtlogd`` pair in its
own private mount namespace (``unshare -m --propagation private``) in which per-node
directories are bind-mounted over ``/run``, ``/etc/libvirt``, ``/var/lib/libvirt``,
``/var/log/libvirt`` and ``/var/cache/libvirt``, and in a network namespace of its own
joined to the others by an underlay (:mod:`harness.underlay`). The libvirtds listen on
their node's underlay address (TCP, no auth; nothing outside the machine reaches the
underlay) with distinct ports and a distinct ``host_uuid`` (libvirt refuses
to migrate to "the same host" otherwise). QEMU runs in TCG mode, so domains must use
``<domain type='qemu'>``.

Layout (``S`` = state_dir, ``N`` = ``S/nodes/<name>``; "in node" = path seen by libvirt
and QEMU inside that node's namespace):

=============================  ===============================  ==========================
in node                        host                             what
=============================  ===============================  ==========================
/run                           N/run                            sockets, pid files
/etc/libvirt                   N/etc                            config, pool definitions
/var/lib/libvirt               N/lib                            domain state
/var/log/libvirt               N/log                            libvirtd.log, qemu/*.log
/var/cache/libvirt             N/cache                          QEMU capabilities cache
/var/lib/libvirt/virtfleet/    N/lib/virtfleet/images           pool ``virtfleet-images``
images                                                          (guest kernel, initrd,
                                                                base images)
/var/lib/libvirt/virtfleet/    N/lib/virtfleet/local            pool ``virtfleet-local``
local                                                           (same path, per-node dir)
/var/lib/libvirt/virtfleet/    S/shared                         pool ``virtfleet-shared``
shared                                                          (really the same dir)
/var/log/libvirt/              N/log/virtfleet-serial           serial console files
virtfleet-serial/<dom>.log
=============================  ===============================  ==========================

Each node's namespace is held by a small Python supervisor (``_supervise``, a child
subreaper) that does the bind mounts and runs ``virtlogd`` and ``libvirtd --listen`` in
the foreground. Pid files land in ``N/run`` (``supervisor.pid``, ``libvirtd.pid``,
``virtlogd.pid``). Processes are also found by their mount table (every process that has
``N/lib`` mounted at /var/lib/libvirt, including the QEMUs, which stay in libvirtd's
namespace because ``namespaces = []``), so ``up`` and ``down`` are idempotent, survive a
crashed harness, and ``down`` verifies that neither processes nor mounts are left.

Settings that matter (see ``_prepare_dirs``): ``listen_tls = 0`` (else libvirtd wants
certificates), ``security_driver = "none"`` and ``remember_owner = 0`` (root-only, files
shared between nodes), ``cgroup_controllers = []`` (both libvirtds would share one cgroup
tree and leave ``machine`` cgroups on the host), distinct ``migration_port_min/max``,
and a distinct ``group`` for QEMU (``Node.qemu_gid``; QEMU stays root): on a real node the
agent's guest firewall keeps the ``libvirt-qemu`` group's connections off the host, here
each node's agent keys its table on its node's group. A node started by an older harness
gets its libvirtd restarted by ``up`` when the config changed (guests keep running).
QEMU's migration and NBD streams use the node's underlay address (qemu.conf
``migration_address``/``migration_host``), so a migration needs no ``--migrateuri``;
a raw one may pass :attr:`Node.migrate_uri`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from harness import underlay
from harness.guest import GuestImage, ensure_guest, make_base_image

__all__ = [
    "BASE_IMAGE_COUNTER_VOLUME",
    "BASE_IMAGE_VOLUME",
    "DEFAULT_NAMES",
    "DEFAULT_PORT_BASE",
    "IMAGES_POOL",
    "INITRD_VOLUME",
    "KERNEL_VOLUME",
    "LOCAL_POOL",
    "POOL_PATHS",
    "SERIAL_DIR_IN_NODE",
    "SHARED_POOL",
    "SMALL_POOL",
    "WATCHDOG_IN_NODE",
    "WATCHDOG_TIMEOUT",
    "Node",
    "NodeError",
    "down",
    "node_pids",
    "nodes",
    "nodes_from_env",
    "serial_log",
    "up",
    "wait_for_serial",
]

DEFAULT_NAMES: tuple[str, ...] = ("node-a", "node-b")
#: node i listens on DEFAULT_PORT_BASE + i (not 16509, so a host libvirtd cannot clash).
#: Override with ``up(port_base=...)`` or ``$VIRTFLEET_NODE_PORT_BASE``.
DEFAULT_PORT_BASE = 16610
#: node i gets QEMU migration/NBD ports MIGRATION_PORT_BASE + 32*i ... + 31.
#: Override with ``$VIRTFLEET_MIGRATION_PORT_BASE`` when another system on this machine
#: migrates at the same time (QEMU would otherwise fail with "address in use").
MIGRATION_PORT_BASE = 49152
#: node i's QEMUs run with group QEMU_GID_BASE + i (no such group needs to exist).
QEMU_GID_BASE = 64600

IMAGES_POOL = "virtfleet-images"
LOCAL_POOL = "virtfleet-local"
SHARED_POOL = "virtfleet-shared"
#: A small pool on a tmpfs of SMALL_POOL_MIB inside each node's namespace (gone with it):
#: where a test fills a disk until the node runs out of space.
SMALL_POOL = "virtfleet-small"
SMALL_POOL_MIB = 80
POOL_PATHS: dict[str, str] = {
    IMAGES_POOL: "/var/lib/libvirt/virtfleet/images",
    LOCAL_POOL: "/var/lib/libvirt/virtfleet/local",
    SHARED_POOL: "/var/lib/libvirt/virtfleet/shared",
    SMALL_POOL: "/var/lib/libvirt/virtfleet/small",
}
#: Volumes every node's image store holds after ``up``.
KERNEL_VOLUME = "guest-vmlinuz"
INITRD_VOLUME = "guest-initrd.img"
BASE_IMAGE_VOLUME = "base-zeros.qcow2"
#: A base image whose first sector holds ``VFCOUNTER 1000`` (see guest.make_base_image).
BASE_IMAGE_COUNTER_VOLUME = "base-counter-1000.qcow2"

SERIAL_DIR_IN_NODE = "/var/log/libvirt/virtfleet-serial"

#: The node's simulated watchdog device (a file; ``N/run/virtfleet-watchdog`` on the
#: host): each write by the agent pets it, a last byte ``V`` (magic close) disarms it.
#: Armed and not petted for WATCHDOG_TIMEOUT seconds, the supervisor "resets" the node:
#: it SIGKILLs every QEMU of the node (libvirtd sees its guests crash), as a hardware
#: watchdog's reset would end them (docs/failover.md).
WATCHDOG_IN_NODE = "/run/virtfleet-watchdog"
#: Longer than an agent's restart on a loaded 2-core machine (~6 s to its first pet): a
#: restarted agent must pet in time, as on a real node (docs/failover.md).
WATCHDOG_TIMEOUT = 10.0

#: in-node mount point -> subdirectory of the node's state dir.
_BIND_DIRS: dict[str, str] = {
    "/run": "run",
    "/etc/libvirt": "etc",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}
_DAEMON_PIDFILES = ("libvirtd.pid", "virtlogd.pid")
_START_TIMEOUT = 60.0
_ENV_STATE = "VIRTFLEET_NODES_STATE_DIR"
_ENV_NAMES = "VIRTFLEET_NODE_NAMES"


class NodeError(RuntimeError):
    """A node could not be started or stopped; the message carries the relevant log tail."""


@dataclass(frozen=True)
class Node:
    """One libvirt node: how to reach it and where its files are on the host."""

    name: str
    uri: str
    port: int
    root: Path
    """Host directory with everything of this node (``state_dir/nodes/<name>``)."""
    shared_dir: Path
    """Host directory of the ``virtfleet-shared`` pool (the same for every node)."""
    serial_dir_in_node: str = SERIAL_DIR_IN_NODE
    qemu_gid: int | None = None
    """Group this node's QEMUs run as (qemu.conf ``group``), unique per node: the agent's
    guest firewall recognises them by it. ``None`` for a node without QEMU (the
    test-driver nodes)."""
    address: str | None = None
    """The node's underlay address (:mod:`harness.underlay`), where its libvirtd listens;
    ``None`` for a node without a network namespace of its own (test-driver nodes)."""

    @property
    def netns(self) -> str | None:
        """The node's network namespace (``vf<tag>-<name>``; its kubelet's too)."""
        if self.address is None:
            return None
        tag = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:6]
        return f"vf{tag}-{self.name}"

    @property
    def migrate_uri(self) -> str:
        """Where a raw ``virsh migrate`` sends QEMU's stream to reach this node."""
        return f"tcp://{self.address}"

    @property
    def env_prefix(self) -> str:
        """``node-a`` -> ``NODE_A`` (prefix of this node's environment variables)."""
        return re.sub(r"[^A-Z0-9]", "_", self.name.upper())

    @property
    def serial_dir_host(self) -> Path:
        return self.host_path(self.serial_dir_in_node)

    @property
    def libvirtd_log(self) -> Path:
        return self.root / "log" / "libvirtd.log"

    @property
    def qemu_log_dir(self) -> Path:
        """QEMU's per-domain stderr/command-line logs (``<domain>.log``), via virtlogd."""
        return self.root / "log" / "qemu"

    def host_path(self, in_node: str | os.PathLike[str]) -> Path:
        """Where a path seen inside the node's namespace really is on the host."""
        p = Path(in_node)
        shared = Path(POOL_PATHS[SHARED_POOL])
        if p == shared or shared in p.parents:
            return self.shared_dir / p.relative_to(shared)
        for mountpoint, sub in _BIND_DIRS.items():
            mp = Path(mountpoint)
            if p == mp or mp in p.parents:
                return self.root / sub / p.relative_to(mp)
        return p

    def serial_log_path(self, domain_name: str) -> str:
        """Path (in node) to put in ``<serial type='file'><source path=.../>``."""
        return f"{self.serial_dir_in_node}/{domain_name}.log"

    def pool_dir(self, pool: str) -> Path:
        """Host directory of one of the node's pools."""
        return self.host_path(POOL_PATHS[pool])


# ---------------------------------------------------------------------------- helpers


def _port_base() -> int:
    return int(os.environ.get("VIRTFLEET_NODE_PORT_BASE", DEFAULT_PORT_BASE))


def nodes(
    state_dir: Path, names: Sequence[str] = DEFAULT_NAMES, port_base: int | None = None
) -> list[Node]:
    """The Node descriptions for a state dir (nothing is started)."""
    state_dir = Path(state_dir).resolve()
    base = _port_base() if port_base is None else port_base
    return [
        Node(
            name=n,
            uri=f"qemu+tcp://{underlay.node_address(state_dir, i)}:{base + i}/system",
            port=base + i,
            root=state_dir / "nodes" / n,
            shared_dir=state_dir / "shared",
            qemu_gid=QEMU_GID_BASE + i,
            address=underlay.node_address(state_dir, i),
        )
        for i, n in enumerate(names)
    ]


def migration_ports(count: int) -> tuple[int, int]:
    """First and last QEMU migration/NBD port of ``count`` nodes (see ``_prepare_dirs``)."""
    base = int(os.environ.get("VIRTFLEET_MIGRATION_PORT_BASE", MIGRATION_PORT_BASE))
    return base, base + 32 * count - 1


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text[-lines:]) or f"({path} is empty)"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True for a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _reap(pid: int) -> None:
    # Only our own children can be reaped; daemons reparented elsewhere are not ours.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def node_pids(node: Node) -> set[int]:
    """Every live process inside the node's mount namespace (libvirtd, virtlogd, QEMUs).

    A process belongs to the node when its mount table shows the node's directory
    mounted at /var/lib/libvirt. This needs no recorded state, so it also finds what a
    crashed harness left behind.
    """
    lib_dir = str(node.root / "lib")
    found: set[int] = set()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            mountinfo = (entry / "mountinfo").read_text()
        except OSError:
            continue
        for line in mountinfo.splitlines():
            fields = line.split()
            # fields[3] = root of the mount within its filesystem, fields[4] = mount point
            if (
                len(fields) > 4
                and fields[4] == "/var/lib/libvirt"
                and fields[3] != "/"
                and lib_dir.endswith(fields[3])
            ):
                if _alive(int(entry.name)):
                    found.add(int(entry.name))
                break
    return found


def _mount_leftovers(node: Node) -> list[str]:
    """Mount table lines anywhere on the machine that still show the node's directories."""
    # fields[3] is the mounted path relative to its filesystem's root, so compare suffixes.
    dirs = [str(node.root / sub) for sub in _BIND_DIRS.values()]
    hits: set[str] = set()
    for entry in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            text = entry.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[3] != "/" and any(d.endswith(fields[3]) for d in dirs):
                hits.add(f"pid {entry.parent.name}: {fields[3]} on {fields[4]}")
    return sorted(hits)


_CONF_MARKER = "# --- virtfleet e2e harness (harness/nodes.py) ---"


def _set_conf(path: Path, values: Mapping[str, str]) -> bool:
    """Set ``key = value`` lines in a libvirt config file (replacing earlier harness
    settings and active lines of the same keys; libvirt rejects duplicate keys).
    Returns whether the file changed."""
    old = path.read_text() if path.exists() else ""
    lines = old.splitlines()
    if _CONF_MARKER in lines:
        lines = lines[: lines.index(_CONF_MARKER)]
    keys = set(values)
    kept = [ln for ln in lines if ln.split("=", 1)[0].strip() not in keys]
    kept.append(_CONF_MARKER)
    kept += [f"{k} = {v}" for k, v in values.items()]
    new = "\n".join(kept) + "\n"
    if new == old:
        return False
    path.write_text(new)
    return True


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _stable_host_uuid(node: Node) -> str:
    """A random host_uuid, kept across restarts (libvirt rejects all-one-digit UUIDs)."""
    f = node.root / "host_uuid"
    if f.exists():
        return f.read_text().strip()
    u = str(uuid.uuid4())
    f.write_text(u + "\n")
    return u


def _prepare_dirs(node: Node, index: int) -> bool:
    """Directories and config of a node; returns whether a config file changed."""
    for sub in _BIND_DIRS.values():
        (node.root / sub).mkdir(parents=True, exist_ok=True)
    node.shared_dir.mkdir(parents=True, exist_ok=True)
    etc = node.root / "etc"
    if not (etc / "libvirtd.conf").exists():
        # The host's config is the template (Debian's defaults, all commented out).
        shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True, symlinks=True)
        # No autostarted networks (libvirt's default NAT network would route a node's
        # guests off the machine).
        autostart = etc / "qemu" / "networks" / "autostart"
        if autostart.is_dir():
            for link in autostart.iterdir():
                link.unlink()
    changed = _set_conf(
        etc / "libvirtd.conf",
        {
            "listen_tls": "0",
            "listen_tcp": "1",
            "listen_addr": _q(str(node.address)),
            "tcp_port": _q(str(node.port)),
            "auth_tcp": _q("none"),
            "auth_unix_rw": _q("none"),
            "host_uuid": _q(_stable_host_uuid(node)),
            "log_outputs": _q("3:file:/var/log/libvirt/libvirtd.log"),
        },
    )
    mig_min = migration_ports(index)[1] + 1  # right after the ports of the nodes before it
    changed |= _set_conf(
        etc / "qemu.conf",
        {
            "user": _q("root"),
            # A group of its own per node: the agent's guest firewall keeps connections of
            # this group (user NICs) off the host; root's other processes are not QEMU.
            "group": _q(f"+{node.qemu_gid}"),
            # Files stay root:root, as with group root (QEMU is root and reads them all).
            "dynamic_ownership": "0",
            "security_driver": _q("none"),
            # Both nodes share the host's files: ownership xattrs would be remembered twice.
            "remember_owner": "0",
            # QEMU in libvirtd's own namespace: it sees the node's bind mounts and down()
            # finds it by namespace.
            "namespaces": "[ ]",
            # Both libvirtds share one cgroup tree; per-domain cgroups named after
            # "qemu-<id>-<name>" would collide between nodes (ids restart at 1 per daemon).
            "cgroup_controllers": "[ ]",
            # QEMU's streams (migration, NBD storage copy) over the node's underlay
            # address (libvirt would announce the hostname, which every node shares).
            "migration_address": _q(str(node.address)),
            "migration_host": _q(str(node.address)),
            "migration_port_min": str(mig_min),
            "migration_port_max": str(mig_min + 31),
        },
    )
    changed |= _set_conf(
        etc / "virtlogd.conf",
        {
            "log_outputs": _q("3:file:/var/log/libvirt/virtlogd.log"),
        },
    )
    for in_node in (*POOL_PATHS.values(), SERIAL_DIR_IN_NODE):
        node.host_path(in_node).mkdir(parents=True, exist_ok=True)
    return changed


# ------------------------------------------------------------------------ supervisor


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _children_of(ppid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            kids.append(int(stat.parent.name))
    return kids


def _reap_any() -> set[int]:
    """Reap every exited child (non-blocking); return their pids."""
    reaped: set[int] = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)


#: Domains whose libvirt status file the supervisor removes at the next libvirtd restart,
#: one name per line (see :func:`forget_dead_domain`).
FORGET_LIST_IN_NODE = "/run/virtfleet-forget-domains"

_STATUS_PID = re.compile(r"<domstatus [^>]*\bpid='(\d+)'")


def _forget_dead_domains(status_dir: Path, forget_list: Path) -> None:
    """With libvirtd stopped: remove the status file of each listed domain whose QEMU is
    not running, so the next libvirtd sees the domain shut off and no stale job."""
    try:
        names = forget_list.read_text().split()
    except FileNotFoundError:
        return
    forget_list.unlink()
    for name in names:
        status = status_dir / f"{name}.xml"
        try:
            match = _STATUS_PID.search(status.read_text())
        except FileNotFoundError:
            print(f"supervisor: {name} has no status file; nothing to forget", flush=True)
            continue
        pid = int(match.group(1)) if match else 0
        if pid and _alive(pid):
            print(f"supervisor: {name}'s QEMU (pid {pid}) runs; status kept", flush=True)
            continue
        status.unlink()
        (status_dir / f"{name}.pid").unlink(missing_ok=True)
        print(f"supervisor: removed {name}'s status file (QEMU pid {pid} not running)", flush=True)


def _supervise(node_root: str, shared_dir: str) -> None:
    """PID of the node: runs inside the node's fresh mount namespace (see _start_node).

    Why a supervisor instead of ``libvirtd -d``: PID 1 on the test machines is not an init
    and reaps orphans only lazily, so daemonized processes and every QEMU that libvirtd
    double-forks would linger as zombies, and nothing would own "the node". This process
    is a child subreaper: orphaned QEMUs are re-parented to it and reaped at once. It
    exits when libvirtd or virtlogd dies (so ``up`` sees a failure immediately); on
    SIGTERM it stops libvirtd, then the QEMUs and virtlogd, and exits last, which takes
    the namespace and its mounts with it.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    root = Path(node_root)
    for mountpoint, sub in _BIND_DIRS.items():
        subprocess.run(["mount", "--bind", str(root / sub), mountpoint], check=True)
    shared = POOL_PATHS[SHARED_POOL]
    os.makedirs(shared, exist_ok=True)
    subprocess.run(["mount", "--bind", shared_dir, shared], check=True)
    small = POOL_PATHS[SMALL_POOL]
    os.makedirs(small, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_POOL_MIB}m,mode=0711", "tmpfs", small],
        check=True,
    )
    os.makedirs("/run/libvirt", exist_ok=True)
    # /var/lock is /run/lock: libvirt locks a console's pty there (virDomainOpenConsole).
    os.makedirs("/run/lock", exist_ok=True)
    os.makedirs(SERIAL_DIR_IN_NODE, exist_ok=True)

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    restart_requested: int | None = None  # the signal that asked for it

    def on_usr1(signum: int, frame: object) -> None:
        nonlocal restart_requested
        restart_requested = signum

    fired_at: list[float] = [0.0]  # mtime of the pet the watchdog last fired after

    def watchdog() -> None:
        try:
            st = os.stat(WATCHDOG_IN_NODE)
            with open(WATCHDOG_IN_NODE, "rb") as fh:
                last = fh.read()[-1:]
        except FileNotFoundError:
            return
        if last == b"V" or st.st_mtime == fired_at[0]:
            return
        if time.time() - st.st_mtime <= WATCHDOG_TIMEOUT:
            return
        fired_at[0] = st.st_mtime
        victims = [p for p in _children_of(os.getpid()) if _comm(p).startswith("qemu")]
        print(f"supervisor: watchdog expired: killing QEMUs {victims}", flush=True)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr1)
    virtlogd = subprocess.Popen(["virtlogd", "-p", "/run/virtlogd.pid"])
    libvirtd = subprocess.Popen(["libvirtd", "--listen", "-p", "/run/libvirtd.pid"])
    Path("/run/supervisor.pid").write_text(f"{os.getpid()}\n")
    daemons = {virtlogd.pid: "virtlogd", libvirtd.pid: "libvirtd"}
    while not stopping:
        if restart_requested is not None:
            # SIGUSR1: restart libvirtd alone (SIGTERM); SIGUSR2: SIGKILL it first, as a
            # crash would. Running QEMUs are left alone either way, as in production.
            crash = restart_requested == signal.SIGUSR2
            restart_requested = None
            print(f"supervisor: restarting libvirtd (crash={crash})", flush=True)
            del daemons[libvirtd.pid]
            if crash:
                libvirtd.kill()
            else:
                libvirtd.terminate()
            deadline = time.monotonic() + 30
            while libvirtd.pid not in _reap_any() and time.monotonic() < deadline:
                time.sleep(0.05)
            _forget_dead_domains(Path("/run/libvirt/qemu"), Path(FORGET_LIST_IN_NODE))
            libvirtd = subprocess.Popen(["libvirtd", "--listen", "-p", "/run/libvirtd.pid"])
            daemons[libvirtd.pid] = "libvirtd"
        watchdog()
        dead = _reap_any() & set(daemons)
        if dead:
            print(
                f"supervisor: {', '.join(daemons[p] for p in dead)} exited; stopping node",
                flush=True,
            )
            break
        time.sleep(0.2)

    def stop(pids: Iterable[int], grace: float) -> None:
        pids = set(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids -= _reap_any()
            pids = {p for p in pids if _alive(p)}
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # libvirtd first so it cannot react to its QEMUs dying (e.g. restart or mark state).
    stop([libvirtd.pid], 10.0)
    for _ in range(3):
        kids = _children_of(os.getpid())
        if not kids:
            break
        stop(kids, 10.0)
    time.sleep(0.1)
    _reap_any()


# ------------------------------------------------------------------------ start/stop

#: Supervisors started by this process, so down() can reap them (no zombies).
_SUPERVISORS: dict[Path, subprocess.Popen[bytes]] = {}


def _stop_node(node: Node, timeout: float = 30.0) -> None:
    """Stop the node's supervisor (and so libvirtd, virtlogd, QEMUs); verify nothing is left."""
    pids = node_pids(node)
    sup = _read_pid(node.root / "run" / "supervisor.pid")
    if sup and sup in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGTERM)
    else:
        # No supervisor (crashed or never started): terminate whatever is there.
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while node_pids(node) and time.monotonic() < deadline:
        if sup:
            _reap(sup)  # only our own supervisor: never steal other children's statuses
        time.sleep(0.1)
    for pid in node_pids(node):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc = _SUPERVISORS.pop(node.root, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    time.sleep(0.05)
    left = node_pids(node)
    if left:
        raise NodeError(f"{node.name}: processes survive SIGKILL: {sorted(left)}")
    mounts = _mount_leftovers(node)
    if mounts:
        raise NodeError(f"{node.name}: mounts left behind:\n" + "\n".join(mounts))


def _daemons_alive(node: Node) -> bool:
    run = node.root / "run"
    pids = {_read_pid(run / f) for f in ("supervisor.pid", *_DAEMON_PIDFILES)}
    live = {p for p in pids if p is not None and _alive(p)}
    # A stale pid file may name an unrelated process: it must be in the node's namespace.
    return len(live) == 3 and live <= node_pids(node)


def _is_up(node: Node) -> bool:
    """Daemons alive and libvirtd answering API calls (not just an open port: libvirtd
    listens before its drivers initialize, and exits if one fails)."""
    if not _daemons_alive(node):
        return False
    try:  # cheap check first: libvirt prints every failed connect to stderr
        with socket.create_connection((str(node.address), node.port), timeout=2):
            pass
    except OSError:
        return False
    import libvirt

    try:
        conn = libvirt.open(node.uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getLibVersion()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def _start_node(node: Node, index: int) -> None:
    if _is_up(node):
        if _prepare_dirs(node, index):
            # Started by an older harness: libvirtd reads its config at start only. The
            # guests keep running (with the settings they started with).
            restart_libvirtd(node)
        return
    _stop_node(node)  # half-started leftovers (e.g. virtlogd without libvirtd)
    _prepare_dirs(node, index)
    assert node.netns is not None
    underlay.ensure(node.root.parent.parent, node.netns, index)
    run = node.root / "run"
    for child in run.iterdir():  # stale sockets, pid files, domain status from a crash
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    launch_log = node.root / "launch.log"
    for log_file in (node.libvirtd_log, node.root / "log" / "virtlogd.log"):
        if log_file.exists():  # so error messages show this start's log only
            log_file.replace(log_file.with_name(log_file.name + ".prev"))
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "VIRTFLEET_NODE": str(node.root),
    }
    code = (
        "from harness.nodes import _supervise; "
        f"_supervise({str(node.root)!r}, {str(node.shared_dir)!r})"
    )
    in_netns = ["nsenter", f"--net=/run/netns/{node.netns}", "--"]
    with launch_log.open("w") as log:
        proc = subprocess.Popen(
            [*in_netns, "unshare", "-m", "--propagation", "private", sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _SUPERVISORS[node.root] = proc
    deadline = time.monotonic() + _START_TIMEOUT
    while not _is_up(node):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_node(node)
            raise NodeError(
                f"{node.name}: libvirtd died or did not answer on port {node.port} "
                f"within {_START_TIMEOUT:.0f}s.\n--- {launch_log}:\n{_tail(launch_log)}\n"
                f"--- {node.libvirtd_log}:\n{_tail(node.libvirtd_log)}"
            )
        time.sleep(0.1)


def _pool_xml(name: str, path: str) -> str:
    return f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"


def _copy_if_changed(src: Path, dst: Path) -> None:
    if (
        dst.exists()
        and dst.stat().st_size == src.stat().st_size
        and dst.read_bytes() == src.read_bytes()
    ):
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _setup_pools(node: Node, guest: GuestImage, base_images: Mapping[str, Path]) -> None:
    """Define/start the three dir pools and fill the image store (idempotent)."""
    # Imported here so the module imports (e.g. for collection) without libvirt-python.
    import libvirt

    images = node.pool_dir(IMAGES_POOL)
    _copy_if_changed(guest.kernel, images / KERNEL_VOLUME)
    _copy_if_changed(guest.initrd, images / INITRD_VOLUME)
    for vol, src in base_images.items():
        _copy_if_changed(src, images / vol)
    conn = libvirt.open(node.uri)
    try:
        existing = {p.name(): p for p in conn.listAllStoragePools(0)}
        for name, path in POOL_PATHS.items():
            pool = existing.get(name) or conn.storagePoolDefineXML(_pool_xml(name, path), 0)
            if not pool.isActive():
                pool.create(0)
            if not pool.autostart():
                pool.setAutostart(1)
            pool.refresh(0)
    finally:
        conn.close()


def _env_for(state_dir: Path, ns: Sequence[Node]) -> dict[str, str]:
    env: dict[str, str] = {
        _ENV_STATE: str(Path(state_dir).resolve()),
        _ENV_NAMES: ",".join(n.name for n in ns),
        "NODE_SERIAL_PATH_IN_NODE": SERIAL_DIR_IN_NODE,
    }
    for n in ns:
        env[f"{n.env_prefix}_URI"] = n.uri
        env[f"{n.env_prefix}_SERIAL_DIR"] = str(n.serial_dir_host)
    return env


def up(
    state_dir: Path,
    names: Sequence[str] = DEFAULT_NAMES,
    *,
    port_base: int | None = None,
    guest: GuestImage | None = None,
) -> dict[str, str]:
    """Start the nodes (idempotent) and return environment variables describing them.

    Returned keys: ``NODE_A_URI``, ``NODE_B_URI``, ``NODE_A_SERIAL_DIR``,
    ``NODE_B_SERIAL_DIR`` (host dirs where each node's serial logs land; one pair per
    node name, ``node-x`` -> ``NODE_X``), ``NODE_SERIAL_PATH_IN_NODE`` (the serial dir
    as libvirt sees it), ``VIRTFLEET_NODES_STATE_DIR`` and ``VIRTFLEET_NODE_NAMES``
    (for :func:`nodes_from_env`).
    """
    if os.geteuid() != 0:
        raise NodeError("harness nodes need root (mount namespaces, libvirtd as root)")
    for tool in ("unshare", "libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            raise NodeError(
                f"{tool} not found: apt-get install libvirt-daemon-system "
                "qemu-system-x86 qemu-utils util-linux"
            )
    state_dir = Path(state_dir).resolve()
    for mp in _BIND_DIRS:
        if state_dir == Path(mp) or Path(mp) in state_dir.parents:
            raise NodeError(
                f"state_dir {state_dir} lies under {mp}, which every node hides "
                "behind a bind mount; choose another directory"
            )
    ns = nodes(state_dir, names, port_base)
    guest = guest or ensure_guest()
    base_dir = state_dir / "base-images"
    base_images = {
        BASE_IMAGE_VOLUME: base_dir / BASE_IMAGE_VOLUME,
        BASE_IMAGE_COUNTER_VOLUME: base_dir / BASE_IMAGE_COUNTER_VOLUME,
    }
    if not base_images[BASE_IMAGE_VOLUME].exists():
        make_base_image(base_images[BASE_IMAGE_VOLUME])
    if not base_images[BASE_IMAGE_COUNTER_VOLUME].exists():
        make_base_image(base_images[BASE_IMAGE_COUNTER_VOLUME], counter=1000)
    with ThreadPoolExecutor(max_workers=len(ns)) as pool:
        futures = [pool.submit(_start_node, n, i) for i, n in enumerate(ns)]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        raise NodeError("\n\n".join(str(e) for e in failed))
    for n in ns:
        _setup_pools(n, guest, base_images)
    return _env_for(state_dir, ns)


def down(state_dir: Path, wipe: bool = False, names: Iterable[str] | None = None) -> None:
    """Stop every node under ``state_dir`` (idempotent); ``wipe`` also deletes their state.

    QEMUs are killed (SIGTERM, then SIGKILL) without asking libvirt: it is fast and works
    when a libvirtd hangs. The mounts live only in the nodes' namespaces, which vanish
    with their last process; this is verified.
    """
    state_dir = Path(state_dir).resolve()
    nodes_dir = state_dir / "nodes"
    if names is None:
        names = sorted(p.name for p in nodes_dir.iterdir()) if nodes_dir.is_dir() else []
    ns = nodes(state_dir, tuple(names))
    errors: list[str] = []
    for index, n in enumerate(ns):
        try:
            _stop_node(n)
        except NodeError as exc:
            errors.append(str(exc))
        if n.netns is not None:
            underlay.remove(state_dir, n.root, n.netns, index)
    if errors:
        raise NodeError("\n".join(errors))
    if wipe:
        for n in ns:
            shutil.rmtree(n.root, ignore_errors=True)
        shutil.rmtree(state_dir / "shared", ignore_errors=True)
        shutil.rmtree(state_dir / "base-images", ignore_errors=True)


# ----------------------------------------------------------------------- test helpers


def nodes_from_env(env: Mapping[str, str] | None = None) -> list[Node]:
    """Rebuild the Node list from the variables ``up`` returned (e.g. in a fixture)."""
    env = os.environ if env is None else env
    try:
        state_dir = Path(env[_ENV_STATE])
        names = env[_ENV_NAMES].split(",")
    except KeyError as exc:
        raise NodeError(f"{exc.args[0]} not set: call harness.nodes.up() first") from exc
    result = []
    for n in nodes(state_dir, names):
        uri = env.get(f"{n.env_prefix}_URI", n.uri)
        host_port = uri.split("//", 1)[1].split("/", 1)[0]
        host, _, port_text = host_port.rpartition(":")
        port = int(port_text)
        result.append(
            Node(
                name=n.name,
                uri=uri,
                port=port,
                root=n.root,
                shared_dir=n.shared_dir,
                qemu_gid=n.qemu_gid,
                address=host,
            )
        )
    return result


def restart_libvirtd(node: Node, timeout: float = 30.0, *, crash: bool = False) -> None:
    """Restart the node's libvirtd (not its guests) and wait until it answers again.

    ``crash``: SIGKILL instead of SIGTERM, so libvirtd gets no chance to tidy up.
    """
    import libvirt

    pidfile = node.root / "run" / "supervisor.pid"
    os.kill(int(pidfile.read_text().strip()), signal.SIGUSR2 if crash else signal.SIGUSR1)
    time.sleep(0.5)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = libvirt.open(node.uri)
            conn.listAllDomains()
            conn.close()
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise NodeError(f"libvirtd of {node.name} did not come back") from None
            time.sleep(0.2)


def kill_qemu(node: Node, domain_name: str) -> bool:
    """SIGKILL the domain's QEMU (its pid file in the node's ``/run/libvirt/qemu``).

    The remedy for a libvirt 9 job without owner that survives libvirtd restarts because
    QEMU did: libvirtd sees the process end and drops the domain's job with it. False
    when the domain has no QEMU (nothing to kill).
    """
    pid = _read_pid(node.root / "run" / "libvirt" / "qemu" / f"{domain_name}.pid")
    if pid is None or not _alive(pid):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        print(f"kill_qemu: {domain_name}'s QEMU (pid {pid}) ended by itself", flush=True)
        return False
    return True


def forget_dead_domain(node: Node, domain_name: str) -> None:
    """The last remedy for a libvirt 9 job without owner: libvirtd died while it forked
    QEMU, so no QEMU exists, and the domain's status file (``pid='0'``, async job
    ``start``) brings the job back on every restart. Stop libvirtd, remove that file
    (only if its QEMU is not running), start libvirtd."""
    forget_list = node.root / "run" / Path(FORGET_LIST_IN_NODE).name  # /run is <root>/run
    with forget_list.open("a") as out:
        out.write(f"{domain_name}\n")
    restart_libvirtd(node)


def serial_log(node: Node, domain_name: str) -> str:
    """The guest's serial console output on that node so far ("" if none yet)."""
    try:
        return (node.serial_dir_host / f"{domain_name}.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_serial(
    node: Node,
    domain_name: str,
    pattern: str | re.Pattern[str],
    timeout: float = 60.0,
    *,
    after: int = 0,
) -> re.Match[str]:
    """Wait until ``pattern`` appears in the serial log (searching from offset ``after``).

    String patterns are compiled with re.MULTILINE, so ``^VF-COUNTER 3$`` matches a line.
    The log of a domain name accumulates across restarts on a node (libvirt opens it in
    append mode), so pass ``after=len(serial_log(...))`` taken before the action.
    Raises TimeoutError with the log tail, so a failing test shows what the guest said.
    """
    rx = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + timeout
    while True:
        text = serial_log(node, domain_name)
        m = rx.search(text, after)
        if m:
            return m
        if time.monotonic() > deadline:
            tail = "\n".join(text[after:].splitlines()[-20:])
            raise TimeoutError(
                f"{pattern!r} not in serial log of {domain_name} on {node.name} after "
                f"{timeout:.0f}s ({node.serial_dir_host / (domain_name + '.log')}); "
                f"tail:\n{tail}\n--- qemu log tail:\n"
                f"{_tail(node.qemu_log_dir / f'{domain_name}.log', 10)}"
            )
        time.sleep(0.2)
