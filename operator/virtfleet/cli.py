"""The ``virtfleet`` command: one entry point for operators, people and CI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from virtfleet import __version__, crdgen, manifests
from virtfleet.api.resources import VIRTUAL_MACHINE


def _cmd_crds(args: argparse.Namespace) -> int:
    if args.stdout:
        for text in crdgen.render_all().values():
            sys.stdout.write(text if text.startswith("---") else "---\n" + text)
        return 0
    outputs = [Path(p) for p in (args.output or crdgen.DEFAULT_DIRECTORIES)]
    if args.check:
        problems = [p for out in outputs for p in crdgen.drift(out)]
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `virtfleet crds` to regenerate", file=sys.stderr)
            return 1
        return 0
    for out in outputs:
        for path in crdgen.write_all(out):
            print(path)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    missing = [p for p in paths if not p.exists()]
    for path in missing:
        print(f"{path}: no such file or directory", file=sys.stderr)
    checked, problems = manifests.validate_paths(p for p in paths if p.exists())
    for problem in problems:
        print(problem)
    if not args.quiet:
        print(
            f"{len(checked)} valid, {len(problems)} problem(s)",
            file=sys.stderr,
        )
    return 1 if problems or missing else 0


def _cmd_render(args: argparse.Namespace) -> int:
    from virtfleet.api.virtualmachine import VirtualMachineSpec
    from virtfleet.domain import DomainError, example_inputs, render_xml

    checked, problems = manifests.validate_paths([Path(args.file)])
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    vms = [c for c in checked if c.kind is VIRTUAL_MACHINE]
    if not vms:
        print(f"{args.file}: no VirtualMachine in it", file=sys.stderr)
        return 1
    for item in vms:
        resource = item.resource
        assert isinstance(resource.spec, VirtualMachineSpec)  # guaranteed by validation
        try:
            xml = render_xml(
                example_inputs(
                    resource.spec,
                    namespace=resource.metadata.namespace or "default",
                    name=resource.metadata.name or "unnamed",
                    uid=resource.metadata.uid,
                    generation=resource.metadata.generation or 1,
                    domain_type=args.domain_type,
                )
            )
        except DomainError as exc:
            print(
                f"{item.source}: {resource.kind}/{resource.metadata.name}: {exc}", file=sys.stderr
            )
            return 1
        sys.stdout.write(xml)
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    import asyncio

    from virtfleet import logs
    from virtfleet.agent import network as agent_network
    from virtfleet.agent.handlers import run
    from virtfleet.agent.settings import AgentSettings
    from virtfleet.hypervisor.download import denied_cidrs
    from virtfleet.runtime.memory import limit_malloc_arenas

    if not args.node:
        print("virtfleet agent: --node (or $NODE_NAME) is required", file=sys.stderr)
        return 2
    logs.configure(args.log_format, args.log_level)
    limit_malloc_arenas()
    settings = AgentSettings(
        node_name=args.node,
        libvirt_uri=args.libvirt_uri,
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
    )
    asyncio.run(run(settings, liveness_endpoint=args.liveness))
    return 0


def _cidr(text: str) -> str:
    """The agent's one CIDR flag check (``none``: an empty list)."""
    from virtfleet.agent.network import cidr_argument

    return cidr_argument(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtfleet",
        description="Declarative, GitOps-native reconciler for libvirt/QEMU virtual machines.",
    )
    parser.add_argument("--version", action="version", version=f"virtfleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crds = sub.add_parser("crds", help="write the CRDs generated from the API models")
    crds.add_argument(
        "-o",
        "--output",
        action="append",
        metavar="DIR",
        help="directory to write into (repeatable; default: crds and charts/virtfleet/crds)",
    )
    crds.add_argument("--check", action="store_true", help="exit 1 if the files differ")
    crds.add_argument("--stdout", action="store_true", help="print all CRDs as one YAML stream")
    crds.set_defaults(func=_cmd_crds)

    validate = sub.add_parser(
        "validate", help="check manifests offline (exit 1 and one line per problem)"
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    validate.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    validate.set_defaults(func=_cmd_validate)

    render = sub.add_parser(
        "render", help="print the libvirt domain XML a VirtualMachine manifest produces"
    )
    render.add_argument("file", metavar="FILE")
    render.add_argument(
        "--domain-type",
        default="qemu",
        choices=["qemu", "kvm"],
        help="qemu (TCG, default) or kvm",
    )
    render.set_defaults(func=_cmd_render)

    import os

    agent = sub.add_parser("agent", help="run the node agent (one per node)")
    agent.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node's name")
    agent.add_argument("--libvirt-uri", default="qemu:///system")
    agent.add_argument("--domain-type", default="qemu", choices=["qemu", "kvm"])
    agent.add_argument("--image-pool", default="virtfleet-images", help="the image store")
    agent.add_argument("--default-pool", default="virtfleet-local", help="pool of disks")
    agent.add_argument(
        "--pool", action="append", metavar="NAME", help="a pool VM disks may use (repeatable)"
    )
    agent.add_argument(
        "--shared-pool",
        action="append",
        metavar="NAME",
        help="a --pool every node sees at the same path (not copied by migrations; repeatable)",
    )
    agent.add_argument("--serial-log-dir", default="/var/log/libvirt/virtfleet-serial")
    agent.add_argument("--workers", type=int, default=8)
    agent.add_argument("--resync-seconds", type=float, default=60.0)
    agent.add_argument("--heartbeat-seconds", type=float, default=10.0)
    agent.add_argument(
        "--http-max-bytes",
        type=int,
        default=16 * 2**30,
        metavar="BYTES",
        help="largest download of a disk's source.http (a disk's own size lowers it)",
    )
    agent.add_argument(
        "--download-dir",
        metavar="DIR",
        help="local scratch directory where source.http downloads are verified (default: TMPDIR)",
    )
    agent.add_argument(
        "--http-deny-cidr",
        action="append",
        type=_cidr,
        metavar="CIDR",
        help="an address range source.http downloads may not connect to (repeatable; "
        "replaces the default: loopback, link-local and unspecified addresses; 'none': "
        "no range)",
    )
    agent.add_argument(
        "--http-allow-cidr",
        action="append",
        type=_cidr,
        metavar="CIDR",
        help="an exception to the denied ranges, e.g. 127.0.0.0/8 for a local image server "
        "(repeatable)",
    )
    agent.add_argument(
        "--cloud-init-secret-label",
        metavar="KEY[=VALUE]",
        help="only Secrets with this label may be a VM's cloudInit.userDataSecretRef "
        "(default: any Secret of the VM's namespace)",
    )
    agent.add_argument(
        "--watch-server-timeout",
        type=float,
        metavar="SECONDS",
        help="longest watch request before it is re-established (default: the apiserver's)",
    )
    agent.add_argument(
        "--watch-stale-seconds",
        type=float,
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
    agent.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    agent.add_argument("--log-level", default="INFO")
    from virtfleet.agent import network as agent_network

    agent_network.add_arguments(agent)
    agent.set_defaults(func=_cmd_agent)

    from virtfleet.controller import command as controller_command

    controller_command.add_parser(sub)

    from virtfleet import actions

    actions.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
