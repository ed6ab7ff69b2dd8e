"""A real Debian guest (``harness.debian``: bookworm with systemd, cloud-init, sshd and
qemu-guest-agent) run by virtfleet: cloud-init consumes the seed virtfleet builds, and an
SSH login with the manifest's key works.

The busybox guest stays for everything else: this one takes ~40 s to boot under TCG.
The SSH client runs in the namespace of the node's DHCP server for the guest's VMNetwork
(on the segment, the node's own way to its VMs), so no address outside the harness is
involved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from harness import controlplane
from harness import nodes as hn
from harness.debian import DebianImage, debian_vm, ensure_debian, place
from harness.testing import (
    Cluster,
    condition,
    console,
    dhcp_servers,
    domain_name,
    guest_exec,
    snapshot_manifest,
    virsh,
    vm_ip,
    vm_manifest,
    wait_for,
    wait_phase,
)

SUBNET = "10.83.0.0/24"
#: alice's password (cloud-init), for the console login.
PASSWORD = "vf-console-pw"
#: Boot to the login prompt under TCG takes ~40 s on the test machines; slack for load.
BOOT_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def debian(system: Cluster) -> DebianImage:
    image = ensure_debian()
    if image.built_in:
        print(f"\n[debian] guest image built in {image.built_in:.0f}s ({image.key})")
    for node in system.nodes:
        place(image, node.pool_dir(hn.IMAGES_POOL))
        virsh(node, "pool-refresh", hn.IMAGES_POOL)
    return image


@pytest.fixture
def segment(system: Cluster, namespace: str) -> Iterator[str]:
    """A VMNetwork for the guest (the way SSH reaches it)."""
    system.apply(
        {
            "apiVersion": "virtfleet.io/v1alpha1",
            "kind": "VMNetwork",
            "metadata": {"name": f"deb-{namespace[-5:]}"},
            "spec": {"namespaces": [namespace], "subnet": SUBNET},
        }
    )
    try:
        yield f"deb-{namespace[-5:]}"
    finally:
        system.kubectl("delete", "vm", "--all", "-n", namespace, "--wait=true", "--timeout=180s")
        system.kubectl("delete", "vmnetwork", f"deb-{namespace[-5:]}", "--wait=true")


def user_data(public_key: str) -> str:
    return (
        "#cloud-config\n"
        "users:\n"
        "  - name: alice\n"
        "    shell: /bin/bash\n"
        "    sudo: ALL=(ALL) NOPASSWD:ALL\n"
        "    lock_passwd: false\n"
        f"    plain_text_passwd: '{PASSWORD}'\n"
        f"    ssh_authorized_keys: ['{public_key}']\n"
        "runcmd:\n"
        '  - echo "VF-RUNCMD $(hostname) $(id -un alice) $(id -u alice)" > /dev/ttyS0\n'
    )


def test_cloud_init_sets_up_a_debian_guest_that_takes_an_ssh_login(
    system: Cluster, namespace: str, debian: DebianImage, segment: str, tmp_path: Path
) -> None:
    node = system.nodes[0]
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    system.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "alice", "namespace": namespace},
            "stringData": {"userdata": user_data(key.with_suffix(".pub").read_text().strip())},
        }
    )
    started = time.monotonic()
    system.apply(
        debian_vm(
            "bookworm",
            namespace,
            nodeName=node.name,
            cloudInit={"userDataSecretRef": {"name": "alice"}},
            interfaces=[{"name": "lan", "type": "network", "network": segment}],
        )
    )
    # The hostname is the VM's name (meta-data local-hostname), on the login banner.
    console(node, namespace, "bookworm", r"^bookworm login:", timeout=BOOT_TIMEOUT_S)
    print(f"\n[debian] created → login prompt: {time.monotonic() - started:.1f}s")
    # The Secret's user-data ran: the user exists, runcmd printed on the console.
    assert console(node, namespace, "bookworm", r"^VF-RUNCMD [^\r\n]*", timeout=120) == (
        "VF-RUNCMD bookworm alice 1000"
    )
    address = vm_ip(system, namespace, "bookworm")

    # SSH with the manifest's key, from the node's side of the guest's segment.
    (server,) = dhcp_servers(node)

    def login() -> str | None:
        done = subprocess.run(
            ["nsenter", f"--net=/proc/{server}/ns/net", "--", "ssh", "-i", str(key),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", f"alice@{address}",
             "hostname; id -un; . /etc/os-release; echo $PRETTY_NAME"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        return done.stdout if done.returncode == 0 else None

    out = wait_for(login, 120, 2.0, "an SSH login with the manifest's key")
    assert out.splitlines() == ["bookworm", "alice", "Debian GNU/Linux 12 (bookworm)"], out
    # qemu-guest-agent answers on the channel every domain has (libvirt on the node
    # asks it), and knows the guest's address.
    domain = domain_name(namespace, "bookworm")
    info = wait_for(
        lambda: virsh(node, "qemu-agent-command", domain, '{"execute":"guest-info"}', check=False),
        120, 2.0, "the guest agent to answer",
    )  # fmt: skip
    assert '"version"' in info, info
    assert address in virsh(node, "domifaddr", domain, "--source", "agent")

    # What the agent says reaches status (polled, not in the reconcile): OS, hostname,
    # the NIC's in-guest name and addresses, AgentConnected; `kubectl get -o wide` shows it.
    def reported() -> dict[str, Any] | None:
        obj = system.get("vm", "bookworm", namespace)
        return obj if condition(obj, "AgentConnected") and (
            obj["status"].get("guestOSInfo")) else None  # fmt: skip

    obj = wait_for(reported, 120, 1.0, "the guest agent's report in status")
    assert condition(obj, "AgentConnected")["status"] == "True"  # type: ignore[index]
    guest = obj["status"]["guestOSInfo"]
    assert (guest["id"], guest["hostname"]) == ("debian", "bookworm"), guest
    assert {"mountPoint": "/", "type": "ext4"} in guest["filesystems"], guest
    (nic,) = obj["status"]["interfaces"]
    assert (nic["interfaceName"], nic["ip"]) == ("eth0", address), nic
    assert address in nic["ipAddresses"]
    wide = system.kubectl("get", "vm", "bookworm", "-n", namespace, "-o", "wide").stdout
    assert address in wide, wide
    assert "Debian GNU/Linux 12 (bookworm)" in wide, wide

    # A quiesced snapshot: the guest's agent froze its filesystems (qemu-ga logs every
    # freeze in the guest's journal) and thawed them again; status says it was quiesced.
    # (The bracket keeps the guest-exec line that runs this grep from matching itself.)
    freezes = "journalctl -b -o cat -t qemu-ga | grep -c '^info: guest-fsfreeze call[e]d' || true"
    before = int(guest_exec(node, domain, freezes).strip() or 0)
    system.apply(snapshot_manifest("calm", namespace, "bookworm", quiesce=True))
    snap = ready_snapshot(system, namespace, "calm", 180)
    assert snap["status"]["quiesced"] is True, snap["status"]
    assert snap["status"]["indications"] == ["Online", "GuestAgent"], snap["status"]
    assert snap["status"]["memoryIncluded"] is False  # quiesce is disks-only
    assert int(guest_exec(node, domain, freezes).strip()) == before + 1
    thawed = virsh(node, "qemu-agent-command", domain, '{"execute":"guest-fsfreeze-status"}')
    assert '"thawed"' in thawed, thawed
    # The guest writes again (a frozen filesystem would block this).
    assert guest_exec(node, domain, "echo ok > /var/tmp/after-snapshot && sync && echo done",
                      timeout=30).strip() == "done"  # fmt: skip

    # `virtfleet console`: a user the cluster allows (virtfleet-console bound in the
    # namespace) logs in on the serial console and runs a command; one without it is
    # refused by the agent (SubjectAccessReview); the admin's client certificate works.
    allowed = user_kubeconfig(
        system, namespace, "operator", tmp_path, role="ClusterRole/virtfleet-console"
    )
    session = console_session(allowed, namespace, "bookworm")
    session.expect_exact("escape character is ^]")
    session.send("\r")
    session.expect("bookworm login: ")
    session.sendline("alice")
    session.expect("Password: ")
    session.sendline(PASSWORD)
    session.expect(r"alice@bookworm:~\$ ")
    session.sendline("echo VF-CONSOLE-$((6*7)) $(id -un)")
    session.expect("VF-CONSOLE-42 alice")
    session.sendline("exit")
    session.expect("bookworm login: ")
    session.send("\x1d")  # Ctrl-]
    session.expect(pexpect.EOF)
    session.close()
    assert session.exitstatus == 0, session.before

    # The stranger may read the VM (so the client finds the endpoint), not its console.
    system.kubectl("create", "role", "vm-reader", "-n", namespace, "--verb=get",
                   "--resource=virtualmachines.virtfleet.io")  # fmt: skip
    denied = user_kubeconfig(system, namespace, "stranger", tmp_path, role="Role/vm-reader")
    refused = console_session(denied, namespace, "bookworm")
    refused.expect(pexpect.EOF)
    refused.close()
    assert refused.exitstatus == 1
    assert 'cannot get resource "virtualmachines/console"' in str(refused.before), refused.before

    admin = console_session(Path(system.env["KUBECONFIG"]), namespace, "bookworm")
    admin.expect_exact("escape character is ^]")
    admin.send("\x1d")
    admin.expect(pexpect.EOF)
    admin.close()
    assert admin.exitstatus == 0, admin.before

    # Halted through the guest agent: the guest now ignores the ACPI power button (shown:
    # pressing it does nothing), yet systemd takes it down cleanly, well inside its grace.
    guest_exec(node, domain, "mkdir -p /etc/systemd/logind.conf.d && printf "
               "'[Login]\\nHandlePowerKey=ignore\\n' > /etc/systemd/logind.conf.d/vf.conf "
               "&& systemctl restart systemd-logind")  # fmt: skip
    virsh(node, "shutdown", domain, "--mode", "acpi")
    time.sleep(8)
    assert virsh(node, "domstate", domain).strip() == "running"
    after = len(hn.serial_log(node, domain))
    stopped = time.monotonic()
    system.kubectl("patch", "vm", "bookworm", "-n", namespace, "--type=merge",
                   "-p", '{"spec":{"runStrategy":"Halted"}}')  # fmt: skip
    hn.wait_for_serial(node, domain, r"reboot: Power down", timeout=120, after=after)
    wait_for(
        lambda: (system.get("vm", "bookworm", namespace).get("status") or {}).get(
            "printableStatus") == "Stopped",
        120, 1.0, "Stopped",
    )  # fmt: skip
    print(f"[debian] Halted → Stopped: {time.monotonic() - stopped:.1f}s")
    halted = system.get("vm", "bookworm", namespace)
    assert condition(halted, "AgentConnected") is None  # only while it runs
    assert "guestOSInfo" not in halted["status"]
    assert not halted["status"]["interfaces"][0].get("ipAddresses")


def test_a_guest_without_an_agent_says_so(system: Cluster, namespace: str) -> None:
    system.apply(
        vm_manifest("silent", namespace, disks=[{"name": "data", "size": "16Mi",
                                                 "source": {"blank": {}}}])
    )  # fmt: skip

    def said() -> dict[str, Any] | None:
        return condition(system.get("vm", "silent", namespace), "AgentConnected")

    cond = wait_for(said, 120, 1.0, "AgentConnected on a guest without an agent")
    assert (cond["status"], cond["reason"]) == ("False", "NotConnected"), cond
    assert "guestOSInfo" not in system.get("vm", "silent", namespace)["status"]

    # Quiesce without an agent: the snapshot is still taken, crash-consistent, and says why.
    system.apply(snapshot_manifest("loud", namespace, "silent", quiesce=True))
    snap = ready_snapshot(system, namespace, "loud", 120)
    assert snap["status"]["quiesced"] is False, snap["status"]
    assert snap["status"]["indications"] == ["Online", "NoGuestAgent"], snap["status"]
    events = system.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        "involvedObject.name=loud,reason=NoGuestAgent",
        "-o",
        "name",
    ).stdout
    assert events.strip(), "a NoGuestAgent Event on the VMSnapshot"  # fmt: skip


def user_kubeconfig(system: Cluster, namespace: str, name: str, folder: Path, *, role: str) -> Path:
    """A ServiceAccount's kubeconfig (token) with ``role`` (``ClusterRole/x`` or
    ``Role/x``) bound to it in ``namespace``."""
    system.kubectl("create", "serviceaccount", name, "-n", namespace)
    kind, _, role_name = role.partition("/")
    binding = (f"--{kind.lower()}={role_name}", f"--serviceaccount={namespace}:{name}")
    system.kubectl("create", "rolebinding", name, "-n", namespace, *binding)
    token = system.kubectl("create", "token", name, "-n", namespace).stdout.strip()
    return controlplane.kubeconfig_for_token(
        folder / f"{name}.kubeconfig",
        system.env["KUBE_APISERVER"],
        controlplane.ca_file(system.state_dir),
        token,
    )


def console_session(kubeconfig: Path, namespace: str, vm: str) -> pexpect.spawn[str]:
    """``virtfleet console`` under a pseudo-terminal, as a user would run it."""
    return pexpect.spawn(
        sys.executable, ["-m", "virtfleet.cli", "console", vm, "-n", namespace],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)}, timeout=60,
        encoding="utf-8", codec_errors="replace",
    )  # fmt: skip


def ready_snapshot(system: Cluster, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    obj = wait_phase(system, "vmsnapshot", namespace, name, ("Ready", "Failed"), timeout)
    assert obj["status"]["phase"] == "Ready", obj["status"]
    return obj
