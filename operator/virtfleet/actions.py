"""Imperative actions that never rewrite the user's spec.

``virtfleet start|stop|restart|pause|unpause VM`` put a request in the VM's
``virtfleet.io/power-request`` annotation (``<action>/<id>``); the node agent acts on each
id once and records it in ``status.lastPowerRequest``. start/stop act on ``Manual`` VMs
only — elsewhere the run strategy in the manifest decides, and the agent says so in an
Event.

``virtfleet snapshot`` and ``virtfleet migrate``: one-shot requests as new objects.

A snapshot or a migration is something that *happens*, not a property of the VM, so the
commands never edit the VM's spec (a GitOps tool would revert that, and the next sync
would undo it). They create a ``VMSnapshot`` / ``VMMigration`` next to the VM — the same
object a person could commit to Git — and print its name; ``--print`` only prints the
manifest, ready to commit, without talking to the cluster.

Names default to ``<vm>-snap-xxxxx`` / ``<vm>-mig-xxxxx`` (``metadata.generateName``), so
running a command twice makes two requests, as a person means it to.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

from virtfleet.api.resources import VIRTUAL_MACHINE, VM_MIGRATION, VM_SNAPSHOT
from virtfleet.identity import API_GROUP, API_VERSION, POWER_ACTIONS, POWER_REQUEST_ANNOTATION

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def snapshot_manifest(
    vm: str, namespace: str, *, name: str | None = None, memory: bool = True
) -> dict[str, Any]:
    """A VMSnapshot of ``vm``; ``memory=False`` asks for disks only (``includeMemory``)."""
    spec: dict[str, Any] = {"vmName": vm}
    if not memory:
        spec["includeMemory"] = False  # unset means "memory when the VM runs"
    return _manifest(VM_SNAPSHOT.kind, vm, namespace, name, "snap", spec)


def migration_manifest(
    vm: str, namespace: str, *, name: str | None = None, target_node: str | None = None
) -> dict[str, Any]:
    """A VMMigration of ``vm``; no ``target_node`` lets the controller choose."""
    spec: dict[str, Any] = {"vmName": vm}
    if target_node:
        spec["targetNode"] = target_node
    return _manifest(VM_MIGRATION.kind, vm, namespace, name, "mig", spec)


def _manifest(
    kind: str, vm: str, namespace: str, name: str | None, suffix: str, spec: dict[str, Any]
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"namespace": namespace}
    if name:
        metadata["name"] = name
    else:
        # The apiserver keeps at most 58 characters of generateName, then adds 5 random.
        metadata["generateName"] = f"{vm[: 58 - len(suffix) - 2]}-{suffix}-"
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": kind,
        "metadata": metadata,
        "spec": spec,
    }


def current_namespace() -> str:
    """The namespace kubectl would use: kubeconfig context, in-cluster, else ``default``."""
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts()  # type: ignore[no-untyped-call]
        namespace = (active or {}).get("context", {}).get("namespace")
        if namespace:
            return str(namespace)
    except Exception:  # no kubeconfig: maybe in a pod
        if SERVICE_ACCOUNT_NAMESPACE.exists():
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    return "default"


async def _create(manifest: dict[str, Any]) -> dict[str, Any]:
    from virtfleet.runtime.kube import KubeClient

    namespace = manifest["metadata"]["namespace"]
    vm = manifest["spec"]["vmName"]
    async with KubeClient(field_manager="virtfleet-cli") as kube:
        await kube.get(VIRTUAL_MACHINE.kind, namespace, vm)  # a clear error if it is missing
        return await kube.create(manifest["kind"], manifest)


def _submit(args: argparse.Namespace, manifest: dict[str, Any]) -> int:
    if args.print:
        sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
        return 0
    from virtfleet.runtime.kube import KubeError

    try:
        created = asyncio.run(_create(manifest))
    except KubeError as exc:
        print(f"virtfleet {args.command}: {exc}", file=sys.stderr)
        return 1
    meta = created["metadata"]
    plural = {VM_SNAPSHOT.kind: VM_SNAPSHOT.plural, VM_MIGRATION.kind: VM_MIGRATION.plural}
    print(f"{plural[created['kind']]}.{API_GROUP}/{meta['name']} created in {meta['namespace']}")
    return 0


def _cmd_snapshot(args: argparse.Namespace) -> int:
    namespace = args.namespace or current_namespace()
    manifest = snapshot_manifest(args.vm, namespace, name=args.name, memory=not args.no_memory)
    return _submit(args, manifest)


def _cmd_migrate(args: argparse.Namespace) -> int:
    namespace = args.namespace or current_namespace()
    manifest = migration_manifest(args.vm, namespace, name=args.name, target_node=args.to)
    return _submit(args, manifest)


def power_request_value(action: str, request_id: str | None = None) -> str:
    """The annotation value of one request; a fresh id makes each invocation act once."""
    if action not in POWER_ACTIONS:
        raise ValueError(f"unknown power action {action!r}")
    return f"{action}/{request_id or uuid.uuid4().hex[:12]}"


async def _request_power(namespace: str, vm: str, value: str) -> None:
    from virtfleet.runtime.kube import KubeClient

    async with KubeClient(field_manager="virtfleet-cli") as kube:
        await kube.patch_metadata(
            VIRTUAL_MACHINE.kind, namespace, vm, annotations={POWER_REQUEST_ANNOTATION: value}
        )


def _cmd_power(args: argparse.Namespace) -> int:
    from virtfleet.runtime.kube import KubeError

    namespace = args.namespace or current_namespace()
    value = power_request_value(args.command)
    try:
        asyncio.run(_request_power(namespace, args.vm, value))
    except KubeError as exc:
        print(f"virtfleet {args.command}: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.command} requested for virtualmachine {namespace}/{args.vm} ({value}); "
        f"see `kubectl describe vm {args.vm} -n {namespace}`"
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``snapshot`` and ``migrate`` (wired into :mod:`virtfleet.cli`)."""
    snap = sub.add_parser(
        "snapshot", help="take a snapshot of a VM (creates a VMSnapshot; never edits the VM)"
    )
    snap.add_argument("vm", metavar="VM", help="the VirtualMachine's name")
    snap.add_argument("--no-memory", action="store_true", help="disks only, even when running")
    snap.set_defaults(func=_cmd_snapshot)

    mig = sub.add_parser(
        "migrate", help="move a VM to another node (creates a VMMigration; never edits the VM)"
    )
    mig.add_argument("vm", metavar="VM", help="the VirtualMachine's name")
    mig.add_argument("--to", metavar="NODE", help="target node (default: the controller picks)")
    mig.set_defaults(func=_cmd_migrate)

    helps = {
        "start": "start a Manual VM",
        "stop": "stop a Manual VM (ACPI, then destroy after the grace period)",
        "restart": "restart a running VM",
        "pause": "pause a running VM",
        "unpause": "resume a paused VM",
    }
    for action in POWER_ACTIONS:
        power = sub.add_parser(action, help=f"{helps[action]} (annotation; never edits the spec)")
        power.add_argument("vm", metavar="VM", help="the VirtualMachine's name")
        power.add_argument("-n", "--namespace", help="the VM's namespace (default: kubectl's)")
        power.set_defaults(func=_cmd_power)

    for parser in (snap, mig):
        parser.add_argument("-n", "--namespace", help="the VM's namespace (default: kubectl's)")
        parser.add_argument("--name", help="name of the new object (default: generated)")
        parser.add_argument(
            "--print", action="store_true", help="print the manifest instead of creating it"
        )
