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

``virtfleet backup`` and ``virtfleet restore`` create a ``VMBackup`` / ``VMRestore`` the
same way, named ``<vm>-<UTC time>`` / ``<vm>-restore-<UTC time>`` unless told (a name that
says when is what a person looks for among backups). Their manifests go through the API
models first (:func:`virtfleet.manifests.check_document`, what ``virtfleet validate``
runs), so a bad name is refused before anything is sent, with the message the CRD's rules
give; ``--wait`` follows the object to its final phase and exits 1 when it failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from virtfleet import manifests
from virtfleet.api.backup import BackupMode, BackupPhase
from virtfleet.api.resources import (
    KINDS_BY_NAME,
    VIRTUAL_MACHINE,
    VM_BACKUP,
    VM_BACKUP_LOCATION,
    VM_MIGRATION,
    VM_RESTORE,
    VM_SNAPSHOT,
    Kind,
)
from virtfleet.api.snapshot import RestorePhase
from virtfleet.identity import API_GROUP, API_VERSION, POWER_ACTIONS, POWER_REQUEST_ANNOTATION

if TYPE_CHECKING:
    from virtfleet.runtime.kubeapi import KubeApi

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: The VMBackupLocation ``virtfleet backup`` uses unless told.
DEFAULT_LOCATION = "default"
#: The time in default names: UTC, sortable, legal in a DNS subdomain.
TIMESTAMP_FORMAT = "%Y%m%d-%H%M%S"
#: Seconds between two reads of the object ``--wait`` follows.
WAIT_INTERVAL = 2.0
#: The phases after which a backup or a restore changes no more, and the successful one.
FINAL_PHASES = {
    VM_BACKUP.kind: ({BackupPhase.COMPLETED.value, BackupPhase.FAILED.value}, "Completed"),
    VM_RESTORE.kind: ({RestorePhase.SUCCEEDED.value, RestorePhase.FAILED.value}, "Succeeded"),
}

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class ManifestError(ValueError):
    """The object a command would create breaks the API's rules (the apiserver would refuse it)."""

    def __init__(self, problems: Sequence[manifests.Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(
            "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in problems)
        )


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


def backup_manifest(
    vm: str,
    namespace: str,
    *,
    location: str = DEFAULT_LOCATION,
    mode: str | None = None,
    name: str | None = None,
    clock: Clock = utcnow,
) -> dict[str, Any]:
    """A VMBackup of ``vm`` to ``location``; no ``mode`` leaves the API's default (Auto)."""
    spec: dict[str, Any] = {"vmName": vm, "location": location}
    if mode is not None:
        spec["mode"] = mode
    return validated(VM_BACKUP, namespace, name or default_name(clock, vm), spec)


def restore_manifest(
    vm: str,
    namespace: str,
    *,
    backup: str | None = None,
    snapshot: str | None = None,
    name: str | None = None,
    clock: Clock = utcnow,
) -> dict[str, Any]:
    """A VMRestore: a new VM named ``vm`` from ``backup``, or ``vm`` back to ``snapshot``
    in place. The model refuses none or both sources, with the apiserver's message."""
    spec: dict[str, Any] = {"vmName": vm}
    if snapshot is not None:
        spec["snapshotName"] = snapshot
    if backup is not None:
        spec["backupName"] = backup
    return validated(VM_RESTORE, namespace, name or default_name(clock, vm, "restore"), spec)


def default_name(clock: Clock, vm: str, *infixes: str) -> str:
    """``<vm>[-<infix>]-<YYYYMMDD-HHMMSS>``, the time in UTC."""
    return "-".join((vm, *infixes, clock().astimezone(UTC).strftime(TIMESTAMP_FORMAT)))


def validated(kind: Kind, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The object as the API models read it (only the fields given), or :class:`ManifestError`
    with each problem ``virtfleet validate`` would report."""
    body = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": kind.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    checked, problems = manifests.check_document(manifests.Document("<command line>", 0, body))
    if checked is None:
        raise ManifestError(problems)
    wire: dict[str, Any] = checked.resource.model_dump(
        mode="json", by_alias=True, exclude_unset=True, exclude_none=True
    )
    return wire


def preconditions(
    manifest: dict[str, Any],
) -> tuple[tuple[tuple[Kind, str], ...], tuple[tuple[Kind, str], ...]]:
    """What must exist, and what must not, in the object's namespace before it is created:
    a typo is then an error at once rather than an object that waits or fails later."""
    spec = manifest["spec"]
    vm = (VIRTUAL_MACHINE, str(spec["vmName"]))
    if manifest["kind"] == VM_BACKUP.kind:
        return (vm, (VM_BACKUP_LOCATION, str(spec["location"]))), ()
    if manifest["kind"] == VM_RESTORE.kind and "backupName" in spec:
        return ((VM_BACKUP, str(spec["backupName"])),), (vm,)  # the restore creates the VM
    if manifest["kind"] == VM_RESTORE.kind:
        return (vm, (VM_SNAPSHOT, str(spec["snapshotName"]))), ()
    return (vm,), ()


def reference(obj: dict[str, Any]) -> str:
    """``vmbackups.virtfleet.io/web-20260101-120000``, as kubectl names objects."""
    return f"{KINDS_BY_NAME[obj['kind']].plural}.{API_GROUP}/{obj['metadata']['name']}"


def progress(obj: dict[str, Any]) -> str:
    """Where a backup or a restore is: its phase, and how far an upload is."""
    status = obj.get("status") or {}
    percent = (status.get("progress") or {}).get("percent")
    line = f"{reference(obj)}: {status.get('phase') or 'Pending'}"
    return line if percent is None else f"{line} {percent}%"


def outcome(obj: dict[str, Any]) -> tuple[bool, str]:
    """Whether a backup or a restore in its final phase succeeded, and the line saying so."""
    status = obj.get("status") or {}
    phase = status.get("phase")
    parts = [f"phase {phase}"]
    if obj["kind"] == VM_BACKUP.kind:
        parts.append(f"type {status.get('type') or '-'}")
        parts.append(f"uploadedBytes {status.get('uploadedBytes', '-')}")
    else:
        parts.append(f"virtualmachine {obj['spec']['vmName']}")
    error = (status.get("error") or {}).get("message")
    if error:
        parts.append(f"error: {error}")
    return phase == FINAL_PHASES[obj["kind"]][1], f"{reference(obj)}: {', '.join(parts)}"


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


async def create(kube: KubeApi, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create the object once what it names is there (and a new VM's name is free)."""
    from virtfleet.runtime.kubeapi import Conflict, NotFound

    namespace = manifest["metadata"]["namespace"]
    needs, absent = preconditions(manifest)
    for kind, name in needs:
        await kube.get(kind, namespace, name)  # a clear error if it is missing
    for kind, name in absent:
        try:
            await kube.get(kind, namespace, name)
        except NotFound:
            continue
        raise Conflict(
            f"{kind.kind} {namespace}/{name} already exists; a restore from a backup creates "
            "a new VM: choose another VM name (or delete that VM first)",
            status=409,
            reason="AlreadyExists",
        )
    return await kube.create(manifest["kind"], manifest)


async def wait_final(
    kube: KubeApi,
    obj: dict[str, Any],
    *,
    report: Callable[[str], None],
    interval: float = WAIT_INTERVAL,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[str, Any]:
    """The backup or restore ``obj`` once in a final phase; ``report`` hears each change."""
    from virtfleet.runtime.kubeapi import ApiUnavailable

    final, _ = FINAL_PHASES[obj["kind"]]
    meta = obj["metadata"]
    said = ""
    while True:
        try:
            obj = await kube.get(obj["kind"], meta["namespace"], meta["name"])
        except ApiUnavailable:
            pass  # the apiserver is back soon; the backup or restore goes on meanwhile
        else:
            if (obj.get("status") or {}).get("phase") in final:
                return obj
            line = progress(obj)
            if line != said:
                report(line)
                said = line
        await sleep(interval)


async def submit(
    kube: KubeApi,
    manifest: dict[str, Any],
    *,
    wait: bool = False,
    interval: float = WAIT_INTERVAL,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> int:
    """Create the object and say so; with ``wait``, follow it to its final phase (1: Failed)."""
    created = await create(kube, manifest)
    print(f"{reference(created)} created in {created['metadata']['namespace']}")
    if not wait:
        return 0
    final = await wait_final(
        kube,
        created,
        report=lambda line: print(line, file=sys.stderr),
        interval=interval,
        sleep=sleep,
    )
    succeeded, line = outcome(final)
    print(line)
    return 0 if succeeded else 1


def _submit(args: argparse.Namespace, manifest: dict[str, Any], *, wait: bool = False) -> int:
    if args.print:
        sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
        return 0
    from kubernetes.config import ConfigException

    from virtfleet.runtime.kube import KubeClient, KubeError

    async def run() -> int:
        async with KubeClient(field_manager="virtfleet-cli") as kube:
            return await submit(kube, manifest, wait=wait)

    try:
        return asyncio.run(run())
    except (KubeError, ConfigException) as exc:
        print(f"virtfleet {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        meta = manifest["metadata"]
        print(
            f"virtfleet {args.command}: interrupted; see `kubectl get "
            f"{KINDS_BY_NAME[manifest['kind']].singular} {meta.get('name', '')} "
            f"-n {meta['namespace']}`",
            file=sys.stderr,
        )
        return 130


def _build_and_submit(
    args: argparse.Namespace, build: Callable[..., dict[str, Any]], **options: str | None
) -> int:
    namespace = args.namespace or current_namespace()
    try:
        manifest = build(args.vm, namespace, name=args.name, **options)
    except ManifestError as exc:
        print(f"virtfleet {args.command}: {exc}", file=sys.stderr)
        return 1
    return _submit(args, manifest, wait=args.wait)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    namespace = args.namespace or current_namespace()
    manifest = snapshot_manifest(args.vm, namespace, name=args.name, memory=not args.no_memory)
    return _submit(args, manifest)


def _cmd_migrate(args: argparse.Namespace) -> int:
    namespace = args.namespace or current_namespace()
    manifest = migration_manifest(args.vm, namespace, name=args.name, target_node=args.to)
    return _submit(args, manifest)


def _cmd_backup(args: argparse.Namespace) -> int:
    return _build_and_submit(args, backup_manifest, location=args.location, mode=args.mode)


def _cmd_restore(args: argparse.Namespace) -> int:
    return _build_and_submit(
        args, restore_manifest, backup=args.from_backup, snapshot=args.from_snapshot
    )


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
    """``snapshot``, ``migrate``, ``backup``, ``restore`` and the power actions (wired into
    :mod:`virtfleet.cli`)."""
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
        "stop": "stop a Manual VM (guest agent or ACPI, then destroy after the grace)",
        "restart": "restart a running VM",
        "pause": "pause a running VM",
        "unpause": "resume a paused VM",
    }
    for action in POWER_ACTIONS:
        power = sub.add_parser(action, help=f"{helps[action]} (annotation; never edits the spec)")
        power.add_argument("vm", metavar="VM", help="the VirtualMachine's name")
        power.add_argument("-n", "--namespace", help="the VM's namespace (default: kubectl's)")
        power.set_defaults(func=_cmd_power)

    backup = sub.add_parser(
        "backup", help="copy a VM's disks to a bucket (creates a VMBackup; never edits the VM)"
    )
    backup.add_argument("vm", metavar="VM", help="the VirtualMachine's name")
    backup.add_argument(
        "--location",
        default=DEFAULT_LOCATION,
        help=f"VMBackupLocation in the VM's namespace (default: {DEFAULT_LOCATION})",
    )
    backup.add_argument(
        "--mode",
        choices=[m.value for m in BackupMode],
        help="Auto (the default): incremental when the previous backup to the location left "
        "a checkpoint, else Full; Incremental fails without one",
    )
    backup.set_defaults(func=_cmd_backup)

    restore = sub.add_parser(
        "restore",
        help="create a VM from a VMBackup or replace a stopped VM's disks with its own "
        "backup's, or bring a VM back to a VMSnapshot (creates a VMRestore)",
    )
    restore.add_argument(
        "vm",
        metavar="VM",
        help="with --from-backup: a new VirtualMachine's name, or the (stopped) VM the backup "
        "was taken of; with --from-snapshot: the VM to restore",
    )
    source = restore.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-backup", metavar="BACKUP", help="VMBackup to restore from")
    source.add_argument(
        "--from-snapshot", metavar="SNAPSHOT", help="VMSnapshot of VM to restore in place"
    )
    restore.set_defaults(func=_cmd_restore)

    for parser, default in (
        (snap, "generated"),
        (mig, "generated"),
        (backup, "VM-YYYYMMDD-HHMMSS, UTC"),
        (restore, "VM-restore-YYYYMMDD-HHMMSS, UTC"),
    ):
        parser.add_argument("-n", "--namespace", help="the VM's namespace (default: kubectl's)")
        parser.add_argument("--name", help=f"name of the new object (default: {default})")
        parser.add_argument(
            "--dry-run",
            "--print",
            dest="print",
            action="store_true",
            help="print the manifest (YAML) instead of creating it; contacts no API",
        )
    for parser in (backup, restore):
        parser.add_argument(
            "--wait", action="store_true", help="wait for the final phase (exit 1: Failed)"
        )
