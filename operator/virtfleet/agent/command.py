"""``virtfleet agent``: its arguments and its entry point (wired into ``virtfleet.cli``).

The flags default to :class:`~virtfleet.agent.settings.AgentSettings`' own defaults, so
each default lives in one place.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from virtfleet.agent import network as agent_network
from virtfleet.agent.settings import AgentSettings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = AgentSettings(node_name="")  # only the field defaults are read
    agent = sub.add_parser("agent", help="run the node agent (one per node)")
    agent.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node's name")
    agent.add_argument("--libvirt-uri", default=defaults.libvirt_uri)
    agent.add_argument(
        "--migration-uri",
        help="how other nodes reach this node's libvirtd, e.g. qemu+tls://NODE/system "
        "(default: --libvirt-uri)",
    )
    agent.add_argument(
        "--migration-uri-for",
        action="append",
        metavar="NODE=URI",
        help="--migration-uri for one node (repeatable; wins over --migration-uri there)",
    )
    agent.add_argument("--domain-type", default=defaults.domain_type, choices=["qemu", "kvm"])
    agent.add_argument("--image-pool", default=defaults.image_pool, help="the image store")
    agent.add_argument("--default-pool", default=defaults.default_pool, help="pool of disks")
    agent.add_argument(
        "--pool", action="append", metavar="NAME", help="a pool VM disks may use (repeatable)"
    )
    agent.add_argument(
        "--shared-pool",
        action="append",
        metavar="NAME",
        help="a --pool every node sees at the same path (not copied by migrations; repeatable)",
    )
    agent.add_argument("--serial-log-dir", default=defaults.serial_log_dir)
    agent.add_argument("--workers", type=int, default=defaults.workers)
    agent.add_argument("--resync-seconds", type=float, default=defaults.resync_seconds)
    agent.add_argument("--heartbeat-seconds", type=float, default=defaults.heartbeat_seconds)
    agent.add_argument("--lease-namespace", default=defaults.lease_namespace)
    agent.add_argument(
        "--lease-seconds",
        type=float,
        default=defaults.lease_seconds,
        help="the heartbeat Lease's duration: silent this long, the node counts as failed",
    )
    agent.add_argument("--lease-renew-seconds", type=float, default=defaults.lease_renew_seconds)
    agent.add_argument(
        "--self-fence-after",
        type=float,
        default=defaults.self_fence_after,
        metavar="SECONDS",
        help="destroy HA VMs' domains when the Lease could not be renewed this long (0: never)",
    )
    agent.add_argument(
        "--watchdog",
        default=defaults.watchdog_path,
        metavar="DEVICE",
        help="a watchdog device to pet while the node holds HA VMs (e.g. /dev/watchdog)",
    )
    agent.add_argument(
        "--watchdog-timeout",
        type=float,
        default=defaults.watchdog_timeout_seconds,
        metavar="SECONDS",
        help="the watchdog device's timeout (declared to the controller)",
    )
    agent.add_argument(
        "--http-max-bytes",
        type=int,
        default=defaults.http_max_bytes,
        metavar="BYTES",
        help="largest download of a disk's source.http (a disk's own size lowers it)",
    )
    agent.add_argument(
        "--download-dir",
        default=defaults.download_dir,
        metavar="DIR",
        help="local scratch directory where source.http downloads are verified (default: TMPDIR)",
    )
    agent.add_argument(
        "--http-deny-cidr",
        action="append",
        type=agent_network.cidr_argument,
        metavar="CIDR",
        help="an address range source.http downloads may not connect to (repeatable; "
        "replaces the default: loopback, link-local and unspecified addresses; 'none': "
        "no range)",
    )
    agent.add_argument(
        "--http-allow-cidr",
        action="append",
        type=agent_network.cidr_argument,
        metavar="CIDR",
        help="an exception to the denied ranges, e.g. 127.0.0.0/8 for a local image server "
        "(repeatable)",
    )
    agent.add_argument(
        "--cloud-init-secret-label",
        default=defaults.cloud_init_secret_label,
        metavar="KEY[=VALUE]",
        help="only Secrets with this label may be a VM's cloudInit.userDataSecretRef "
        "(default: any Secret of the VM's namespace)",
    )
    agent.add_argument(
        "--watch-server-timeout",
        type=float,
        default=defaults.watch_server_timeout,
        metavar="SECONDS",
        help="longest watch request before it is re-established (default: the apiserver's)",
    )
    agent.add_argument(
        "--watch-stale-seconds",
        type=float,
        default=defaults.watch_stale_seconds,
        metavar="SECONDS",
        help="liveness fails when the agent's own VMHost heartbeat was not seen through the "
        "watch for this long (default: max(60, 6 heartbeats))",
    )
    agent.add_argument(
        "--liveness",
        metavar="URL",
        help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz: fails when "
        "libvirt does not answer or the watch went deaf",
    )
    agent.add_argument(
        "--tunnel-address",
        type=_ipv4,
        default=defaults.tunnel_address,
        metavar="IP",
        help="this node's underlay address, its VXLAN endpoint for VMNetworks (the chart "
        "passes the node's address; default: none, no VMNetworks on this node)",
    )
    agent.add_argument(
        "--guest-agent-poll-seconds",
        type=float,
        default=defaults.guest_agent_poll_seconds,
        metavar="S",
        help="how often each running VM's qemu-guest-agent is asked for OS, addresses and "
        f"filesystems (default {defaults.guest_agent_poll_seconds:g})",
    )
    agent.add_argument(
        "--nat-deny-cidr",
        action="append",
        type=agent_network.cidr_argument,
        default=[],
        metavar="CIDR",
        help="a range VMNetwork NAT gateways may not reach (repeatable): the cluster's pod, "
        "Service and node networks; link-local, the nodes and DNAT'd destinations always",
    )
    agent.add_argument(
        "--guest-thaw-after-seconds",
        type=float,
        default=defaults.guest_thaw_after_seconds,
        metavar="S",
        help="thaw a guest whose agent has said it is frozen for this long (default "
        f"{defaults.guest_thaw_after_seconds:g})",
    )
    agent.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none)",
    )
    agent.add_argument(
        "--metrics-interval-seconds",
        type=float,
        default=defaults.metrics_interval_seconds,
        metavar="S",
        help="how often VMs' usage is read, one libvirt call for all (default "
        f"{defaults.metrics_interval_seconds:g})",
    )
    agent.add_argument(
        "--console-listen",
        metavar="HOST:PORT",
        help="serve `virtfleet console` on this address (TLS, callers checked with "
        "TokenReview/SubjectAccessReview); default: no console on this node",
    )
    agent.add_argument(
        "--console-advertise",
        metavar="HOST",
        help="the address clients connect to, written into VMs' status.consoleEndpoint "
        "(default: the --console-listen host)",
    )
    agent.add_argument(
        "--network-state-dir",
        default=defaults.network_state_dir,
        metavar="DIR",
        help=f"where VMNetworks' DHCP servers keep their files (default "
        f"{defaults.network_state_dir})",
    )
    agent.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    agent.add_argument("--log-level", default="INFO")
    agent_network.add_arguments(agent)
    agent.set_defaults(func=run)


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from exc


def node_migration_uri(node: str, default: str | None, per_node: list[str] | None) -> str | None:
    """This node's entry of ``--migration-uri-for NODE=URI``, else ``--migration-uri``."""
    for item in per_node or ():
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise ValueError(f"--migration-uri-for {item!r}: expected NODE=URI")
        if name == node:
            return uri
    return default or None


def run(args: argparse.Namespace) -> int:
    import asyncio

    from virtfleet.runtime.memory import leave_out_official_client

    official_client_left_out = leave_out_official_client()  # before kopf (handlers)

    from virtfleet import logs
    from virtfleet.agent.handlers import run as run_agent
    from virtfleet.hypervisor.download import denied_cidrs
    from virtfleet.runtime.memory import limit_malloc_arenas
    from virtfleet.runtime.useragent import identify

    if not args.node:
        print("virtfleet agent: --node (or $NODE_NAME) is required", file=sys.stderr)
        return 2
    logs.configure(args.log_format, args.log_level)
    limit_malloc_arenas()
    if not official_client_left_out:
        logs.get_logger("virtfleet.agent").warning(
            "the official Kubernetes client was imported before the agent started: "
            "~18 MiB more resident memory"
        )
    identify("agent", args.node)
    try:
        migration_uri = node_migration_uri(args.node, args.migration_uri, args.migration_uri_for)
    except ValueError as exc:
        print(f"virtfleet agent: {exc}", file=sys.stderr)
        return 2
    settings = AgentSettings(
        node_name=args.node,
        libvirt_uri=args.libvirt_uri,
        migration_uri=migration_uri,
        domain_type=args.domain_type,
        image_pool=args.image_pool,
        default_pool=args.default_pool,
        disk_pools=tuple(args.pool or (args.default_pool,)),
        shared_pools=tuple(args.shared_pool or ()),
        serial_log_dir=args.serial_log_dir,
        workers=args.workers,
        resync_seconds=args.resync_seconds,
        heartbeat_seconds=args.heartbeat_seconds,
        http_max_bytes=args.http_max_bytes,
        download_dir=args.download_dir,
        http_deny_cidrs=denied_cidrs(args.http_deny_cidr),
        http_allow_cidrs=tuple(args.http_allow_cidr or ()),
        cloud_init_secret_label=args.cloud_init_secret_label or None,
        watch_server_timeout=args.watch_server_timeout,
        watch_stale_seconds=args.watch_stale_seconds,
        network=agent_network.policy_from_args(args),
        lease_namespace=args.lease_namespace,
        lease_seconds=args.lease_seconds,
        lease_renew_seconds=args.lease_renew_seconds,
        self_fence_after=args.self_fence_after or None,
        watchdog_path=args.watchdog or None,
        watchdog_timeout_seconds=args.watchdog_timeout,
        tunnel_address=args.tunnel_address,
        nat_deny_cidrs=tuple(c for c in args.nat_deny_cidr if c != "none"),
        guest_agent_poll_seconds=args.guest_agent_poll_seconds,
        guest_thaw_after_seconds=args.guest_thaw_after_seconds,
        metrics_listen=args.metrics_listen,
        metrics_interval_seconds=args.metrics_interval_seconds,
        console_listen=args.console_listen,
        console_advertise=args.console_advertise,
        network_state_dir=args.network_state_dir,
    )
    asyncio.run(run_agent(settings, liveness_endpoint=args.liveness))
    return 0
