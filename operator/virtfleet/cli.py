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

    from virtfleet.agent import command as agent_command

    agent_command.add_parser(sub)

    from virtfleet.controller import command as controller_command

    controller_command.add_parser(sub)

    from virtfleet import actions

    actions.add_parsers(sub)

    from virtfleet import consolecli

    consolecli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
