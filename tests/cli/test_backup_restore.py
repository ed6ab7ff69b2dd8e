"""``virtfleet backup`` and ``virtfleet restore``: the objects they build, the checks made
before creating them, and ``--wait``; against the in-memory API, never an apiserver."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from testkit.kube import FakeKube
from virtfleet import actions, crdgen
from virtfleet.actions import ManifestError, backup_manifest, restore_manifest
from virtfleet.api.resources import VM_RESTORE
from virtfleet.cli import build_parser, main
from virtfleet.runtime.kubeapi import ApiUnavailable, Conflict, KindLike, NotFound

NOW = datetime(2026, 3, 1, 4, 5, 6, tzinfo=UTC)
STAMP = "20260301-040506"
R1 = ("VMRestore", "r1")


def clock() -> datetime:
    return NOW


def cel_messages(schema: Any) -> Iterator[str]:
    """Every x-kubernetes-validations message in a CRD (what the apiserver answers)."""
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            yield rule["message"]
        for value in schema.values():
            yield from cel_messages(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from cel_messages(value)


# --- the manifests ------------------------------------------------------------------------


def test_backup_manifest_defaults() -> None:
    assert backup_manifest("web", "shop", clock=clock) == {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMBackup",
        "metadata": {"name": f"web-{STAMP}", "namespace": "shop"},
        # mode left to the API's default (Auto), as a person would write it
        "spec": {"vmName": "web", "location": "default"},
    }


def test_backup_manifest_with_everything_given() -> None:
    manifest = backup_manifest(
        "web", "shop", location="offsite", mode="Incremental", name="nightly", clock=clock
    )
    assert manifest["metadata"] == {"name": "nightly", "namespace": "shop"}
    assert manifest["spec"] == {"vmName": "web", "location": "offsite", "mode": "Incremental"}


def test_default_names_are_in_utc() -> None:
    def paris() -> datetime:
        return datetime(2026, 3, 1, 5, 5, 6, tzinfo=timezone(timedelta(hours=1)))

    assert backup_manifest("web", "shop", clock=paris)["metadata"]["name"] == f"web-{STAMP}"
    restore = restore_manifest("web", "shop", backup="b", clock=paris)
    assert restore["metadata"]["name"] == f"web-restore-{STAMP}"


def test_restore_from_a_backup_names_the_new_vm() -> None:
    assert restore_manifest("web-copy", "shop", backup=f"web-{STAMP}", clock=clock) == {
        "apiVersion": "virtfleet.io/v1alpha1",
        "kind": "VMRestore",
        "metadata": {"name": f"web-copy-restore-{STAMP}", "namespace": "shop"},
        "spec": {"vmName": "web-copy", "backupName": f"web-{STAMP}"},
    }


def test_restore_from_a_snapshot_is_in_place() -> None:
    manifest = restore_manifest("web", "shop", snapshot="before-upgrade", name="undo")
    assert manifest["metadata"] == {"name": "undo", "namespace": "shop"}
    assert manifest["spec"] == {"vmName": "web", "snapshotName": "before-upgrade"}


@pytest.mark.parametrize("sources", [{}, {"backup": "b", "snapshot": "s"}], ids=["neither", "both"])
def test_a_restore_has_exactly_one_source_with_the_apiservers_message(
    sources: dict[str, str],
) -> None:
    message = "a restore needs exactly one of snapshotName or backupName"
    assert message in set(cel_messages(crdgen.crd_for(VM_RESTORE)))  # the CRD's own rule
    with pytest.raises(ManifestError) as caught:
        restore_manifest("web", "shop", clock=clock, **sources)
    assert str(caught.value) == f"spec: {message}"


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda: backup_manifest("Web", "shop", clock=clock),
            "spec.vmName: must be a DNS label: lowercase letters, digits and '-', starting "
            "and ending with a letter or digit; got 'Web'",
        ),
        (
            lambda: backup_manifest("web", "shop", name="Nightly_1"),
            "metadata.name: must be a DNS subdomain: lowercase letters, digits, '-' and '.'",
        ),
        (
            lambda: backup_manifest("web", "Shop"),
            "metadata.namespace: must be a DNS label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
        ),
        (
            lambda: backup_manifest("web", "shop", location="S3"),
            "spec.location: must be a DNS subdomain: lowercase letters, digits, '-' and '.'; "
            "got 'S3'",
        ),
        (
            lambda: backup_manifest("web", "shop", mode="Sometimes"),
            "spec.mode: Input should be 'Auto', 'Full' or 'Incremental'",
        ),
        (
            lambda: backup_manifest("w" * 64, "shop", name="long"),
            "spec.vmName: String should have at most 63 characters",
        ),
        (
            lambda: restore_manifest("web", "shop", snapshot="Snap"),
            "spec.snapshotName: must be a DNS label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit; got 'Snap'",
        ),
    ],
    ids=["vm", "name", "namespace", "location", "mode", "vm-length", "snapshot"],
)
def test_bad_values_are_refused_locally(call: Any, expected: str) -> None:
    with pytest.raises(ManifestError) as caught:
        call()
    assert str(caught.value) == expected


# --- the command line ---------------------------------------------------------------------


def test_backup_arguments() -> None:
    args = build_parser().parse_args(["backup", "web"])
    assert (args.vm, args.location, args.mode, args.name, args.namespace) == (
        "web",
        "default",
        None,
        None,
        None,
    )
    assert (args.wait, args.print, args.func) == (False, False, actions._cmd_backup)
    given = "backup web --location s3 --mode Full --name n -n shop --wait --dry-run"
    args = build_parser().parse_args(given.split())
    assert (args.location, args.mode, args.name, args.namespace) == ("s3", "Full", "n", "shop")
    assert args.wait
    assert args.print
    assert build_parser().parse_args(["backup", "web", "--print"]).print  # as snapshot's


def test_backup_mode_is_one_of_the_api_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["backup", "web", "--mode", "full"])
    assert exited.value.code == 2
    assert "invalid choice: 'full'" in capsys.readouterr().err


def test_restore_arguments() -> None:
    args = build_parser().parse_args(["restore", "copy", "--from-backup", "b", "-n", "shop"])
    assert (args.vm, args.from_backup, args.from_snapshot, args.namespace) == (
        "copy",
        "b",
        None,
        "shop",
    )
    args = build_parser().parse_args(["restore", "web", "--from-snapshot", "s", "--wait"])
    assert (args.from_backup, args.from_snapshot, args.wait) == (None, "s", True)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ([], "one of the arguments --from-backup --from-snapshot is required"),
        (
            ["--from-backup", "b", "--from-snapshot", "s"],
            "argument --from-snapshot: not allowed with argument --from-backup",
        ),
    ],
    ids=["neither", "both"],
)
def test_restore_takes_exactly_one_source(
    extra: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["restore", "web", *extra])
    assert exited.value.code == 2
    assert error in capsys.readouterr().err


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach an apiserver fails the test."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("contacted the API")

    monkeypatch.setattr("virtfleet.runtime.kube.KubeClient", refuse)


@pytest.mark.usefixtures("no_cluster")
def test_dry_run_prints_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup", "web", "-n", "shop", "--mode", "Full", "--dry-run", "--wait"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kind"] == "VMBackup"
    assert printed["metadata"]["name"].startswith("web-")
    assert printed["spec"] == {"vmName": "web", "location": "default", "mode": "Full"}

    assert main(["restore", "copy", "--from-backup", "b", "-n", "shop", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["spec"] == {"vmName": "copy", "backupName": "b"}


@pytest.mark.usefixtures("no_cluster")
def test_a_refused_manifest_exits_1_without_contacting_the_api(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["restore", "Web", "--from-snapshot", "s", "-n", "shop"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("virtfleet restore: spec.vmName: must be a DNS label")


def test_no_kubeconfig_is_an_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["backup", "web", "-n", "shop"]) == 1
    assert capsys.readouterr().err.startswith("virtfleet backup: ")


# --- creating and waiting, against the in-memory API -------------------------------------


def cluster(*names: tuple[str, str]) -> FakeKube:
    """``(kind, name)`` objects in namespace ``shop``."""
    kube = FakeKube()
    for kind, name in names:
        kube.put(kind, {"metadata": {"namespace": "shop", "name": name}, "spec": {}})
    return kube


class Stepper:
    """A ``sleep`` that moves the object ``--wait`` follows on to its next status."""

    def __init__(self, kube: FakeKube, kind: str, name: str, steps: list[dict[str, Any]]):
        self.kube, self.kind, self.name, self.steps = kube, kind, name, steps
        self.slept = 0

    async def __call__(self, seconds: float) -> None:
        self.slept += 1
        await self.kube.patch_status(self.kind, "shop", self.name, self.steps.pop(0))


async def test_backup_needs_its_vm_and_location() -> None:
    manifest = backup_manifest("web", "shop", location="s3", name="b1")
    with pytest.raises(NotFound, match="VirtualMachine shop/web"):
        await actions.submit(cluster(("VMBackupLocation", "s3")), manifest)
    with pytest.raises(NotFound, match="VMBackupLocation shop/s3"):
        await actions.submit(cluster(("VirtualMachine", "web")), manifest)


async def test_backup_created_and_followed_to_completed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    kube = cluster(("VirtualMachine", "web"), ("VMBackupLocation", "default"))
    sleep = Stepper(
        kube,
        "VMBackup",
        "b1",
        [
            {"phase": "Uploading", "type": "Full", "progress": {"percent": 40}},
            {"phase": "Uploading", "type": "Full", "progress": {"percent": 40}},
            {"phase": "Completed", "type": "Full", "uploadedBytes": 1048576},
        ],
    )
    manifest = backup_manifest("web", "shop", name="b1")
    assert await actions.submit(kube, manifest, wait=True, sleep=sleep) == 0
    assert kube.calls[0] == ("create", "b1", manifest)
    assert sleep.slept == 3
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "vmbackups.virtfleet.io/b1 created in shop",
        "vmbackups.virtfleet.io/b1: phase Completed, type Full, uploadedBytes 1048576",
    ]
    assert err.splitlines() == [  # each change once
        "vmbackups.virtfleet.io/b1: Pending",
        "vmbackups.virtfleet.io/b1: Uploading 40%",
    ]


async def test_a_failed_backup_exits_1_with_its_error(capsys: pytest.CaptureFixture[str]) -> None:
    kube = cluster(("VirtualMachine", "web"), ("VMBackupLocation", "default"))
    failed = {"phase": "Failed", "error": {"message": "no checkpoint to build on"}}
    sleep = Stepper(kube, "VMBackup", "b1", [failed])
    manifest = backup_manifest("web", "shop", mode="Incremental", name="b1")
    assert await actions.submit(kube, manifest, wait=True, sleep=sleep) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "vmbackups.virtfleet.io/b1: phase Failed, type -, uploadedBytes -, "
        "error: no checkpoint to build on"
    )


async def test_waiting_rides_out_an_unavailable_apiserver() -> None:
    class Flaky(FakeKube):
        outages = 2

        async def get(self, kind: KindLike, namespace: str | None, name: str) -> dict[str, Any]:
            if kind == "VMBackup" and self.outages:
                self.outages -= 1
                raise ApiUnavailable("connection refused")
            return await super().get(kind, namespace, name)

    kube = Flaky()
    for kind, name in (("VirtualMachine", "web"), ("VMBackupLocation", "default")):
        kube.put(kind, {"metadata": {"namespace": "shop", "name": name}, "spec": {}})
    done = {"phase": "Completed", "type": "Full", "uploadedBytes": 1}
    sleep = Stepper(kube, "VMBackup", "b1", [{}, done, done])
    manifest = backup_manifest("web", "shop", name="b1")
    assert await actions.submit(kube, manifest, wait=True, sleep=sleep) == 0
    assert sleep.slept == 2


async def test_restore_from_a_backup_needs_the_backup_and_a_free_vm_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = restore_manifest("copy", "shop", backup="b1", name="r1")
    with pytest.raises(NotFound, match="VMBackup shop/b1"):
        await actions.submit(cluster(), manifest)
    taken = cluster(("VMBackup", "b1"), ("VirtualMachine", "copy"))
    with pytest.raises(Conflict, match="VirtualMachine shop/copy already exists"):
        await actions.submit(taken, manifest)
    assert taken.calls == []

    kube = cluster(("VMBackup", "b1"))
    done = {"phase": "Succeeded", "vmCreated": True}
    assert await actions.submit(kube, manifest, wait=True, sleep=Stepper(kube, *R1, [done])) == 0
    assert capsys.readouterr().out.splitlines() == [
        "vmrestores.virtfleet.io/r1 created in shop",
        "vmrestores.virtfleet.io/r1: phase Succeeded, virtualmachine copy",
    ]


async def test_restore_from_a_snapshot_needs_the_vm_and_the_snapshot(
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = restore_manifest("web", "shop", snapshot="s1", name="r1")
    with pytest.raises(NotFound, match="VMSnapshot shop/s1"):
        await actions.submit(cluster(("VirtualMachine", "web")), manifest)
    with pytest.raises(NotFound, match="VirtualMachine shop/web"):
        await actions.submit(cluster(("VMSnapshot", "s1")), manifest)

    kube = cluster(("VirtualMachine", "web"), ("VMSnapshot", "s1"))
    failed = {"phase": "Failed", "error": {"message": "snapshot s1 is not Ready"}}
    assert await actions.submit(kube, manifest, wait=True, sleep=Stepper(kube, *R1, [failed])) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "vmrestores.virtfleet.io/r1: phase Failed, virtualmachine web, "
        "error: snapshot s1 is not Ready"
    )


async def test_without_wait_it_only_creates(capsys: pytest.CaptureFixture[str]) -> None:
    kube = cluster(("VirtualMachine", "web"), ("VMBackupLocation", "default"))

    async def never(_: float) -> None:
        raise AssertionError("waited")

    assert await actions.submit(kube, backup_manifest("web", "shop", name="b1"), sleep=never) == 0
    assert capsys.readouterr().out == "vmbackups.virtfleet.io/b1 created in shop\n"


def test_main_creates_through_the_client_and_reports_api_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole command: ``main`` → KubeClient (here the in-memory API) → exit code."""

    class Client(FakeKube):
        def __init__(self, **_: object) -> None:
            super().__init__()
            self.put("VirtualMachine", {"metadata": {"namespace": "shop", "name": "web"}})
            self.put("VMBackupLocation", {"metadata": {"namespace": "shop", "name": "default"}})

        async def __aenter__(self) -> Client:
            return self

        async def __aexit__(self, *_: object) -> None:
            return None

        async def create(self, kind: KindLike, body: Any) -> dict[str, Any]:
            created = await super().create(kind, body)
            name = created["metadata"]["name"]
            done = {"phase": "Completed", "type": "Full", "uploadedBytes": 7}
            await self.patch_status(kind, "shop", name, done)  # an instant backup
            return created

    monkeypatch.setattr("virtfleet.runtime.kube.KubeClient", Client)
    assert main(["backup", "web", "-n", "shop", "--name", "b1", "--wait"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "vmbackups.virtfleet.io/b1: phase Completed, type Full, uploadedBytes 7"
    )
    assert main(["backup", "gone", "-n", "shop"]) == 1
    assert capsys.readouterr().err == ("virtfleet backup: VirtualMachine shop/gone not found\n")
