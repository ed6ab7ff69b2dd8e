"""``virtfleet controller``: its arguments and its entry point (wired into ``virtfleet.cli``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from virtfleet import logs
from virtfleet.controller.settings import ControllerSettings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = ControllerSettings()
    parser = sub.add_parser(
        "controller", help="run the controller: placement and node heartbeats (a kopf operator)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--standalone", action="store_true", help="no kopf peering (the default)")
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none)",
    )
    mode.add_argument(
        "--peering", metavar="NAME", help="kopf peering object for an HA pair (needs its CRD)"
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        metavar="NS",
        help="VM namespaces to serve, globs allowed (repeatable; default: all)",
    )
    seconds = {"type": float, "metavar": "SECONDS"}
    parser.add_argument(
        "--retry-interval",
        default=defaults.retry_interval,
        help="placement retry of unschedulable VMs",
        **seconds,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--resync-interval",
        default=defaults.resync_interval,
        help="full pass over all VMs",
        **seconds,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--heartbeat-timeout",
        default=defaults.heartbeat_timeout,
        help="an agent silent this long makes its VMs Unknown",
        **seconds,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--lease-namespace",
        default=defaults.lease_namespace,
        help="namespace of the agents' heartbeat Leases",
    )
    parser.add_argument(
        "--lease-poll-interval",
        default=defaults.lease_poll_interval,
        help="how often the agents' Leases are read and node health judged",
        **seconds,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--fence-margin",
        default=defaults.fence_margin,
        help="added to a node's self-fence + watchdog time before the controller fences it",
        **seconds,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--failure-damping",
        default=defaults.failure_damping,
        help="no placements on a node back from a failure for this long (doubled per "
        "failure in 10 minutes)",
        **seconds,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--failure-damping-max",
        default=defaults.failure_damping_max,
        help="the longest such hold",
        **seconds,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--heartbeat-check-interval",
        default=defaults.heartbeat_check_interval,
        help="how often heartbeats are checked",
        **seconds,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--overcommit",
        type=float,
        default=defaults.overcommit,
        metavar="RATIO",
        help="placeable memory = host memory x RATIO",
    )
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument(
        "--max-migrations-per-node",
        type=int,
        default=defaults.max_migrations_per_node,
        help="parallel migrations out of one node",
    )
    parser.add_argument(
        "--max-migrations-cluster",
        type=int,
        default=defaults.max_migrations_cluster,
        help="parallel migrations in the cluster",
    )
    parser.add_argument("--log-format", choices=["json", "console", "auto"], default="auto")
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from virtfleet.controller.controller import Controller
    from virtfleet.runtime.kube import KubeClient
    from virtfleet.runtime.memory import limit_malloc_arenas
    from virtfleet.runtime.useragent import identify

    identify("controller")
    try:
        settings = ControllerSettings(
            retry_interval=args.retry_interval,
            resync_interval=args.resync_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            heartbeat_check_interval=args.heartbeat_check_interval,
            lease_namespace=args.lease_namespace,
            lease_poll_interval=args.lease_poll_interval,
            fence_margin=args.fence_margin,
            failure_damping=args.failure_damping,
            failure_damping_max=args.failure_damping_max,
            overcommit=args.overcommit,
            workers=args.workers,
            max_migrations_per_node=args.max_migrations_per_node,
            max_migrations_cluster=args.max_migrations_cluster,
        )
    except ValueError as exc:
        print(f"virtfleet controller: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_format, args.log_level)
    limit_malloc_arenas()

    async def main() -> None:
        controller = Controller(KubeClient(field_manager="virtfleet-controller"), settings)
        await controller.run(
            standalone=args.peering is None,
            peering_name=args.peering,
            namespaces=args.namespace or (),
            log_format=args.log_format,
            log_level=args.log_level,
            liveness_endpoint=args.liveness,
            metrics_listen=args.metrics_listen,
        )

    asyncio.run(main())
    return 0
