"""The guest agent's answers as libvirt gives them, read into a report (pure)."""

from __future__ import annotations

from virtfleet.domain.guestagent import (
    AgentFilesystem,
    AgentInterface,
    channel_connected,
    report_from,
)

#: What libvirt 9.0 answered for the Debian test guest (shape of guestInfo and
#: interfaceAddresses with the agent as source).
INFO = {
    "os.id": "debian",
    "os.name": "Debian GNU/Linux",
    "os.pretty-name": "Debian GNU/Linux 12 (bookworm)",
    "os.version": "12 (bookworm)",
    "os.version-id": "12",
    "os.kernel-release": "6.1.0-57-cloud-amd64",
    "hostname": "bookworm",
    "fs.count": 2,
    "fs.0.mountpoint": "/",
    "fs.0.fstype": "ext4",
    "fs.0.used-bytes": 812345344,
    "fs.1.mountpoint": "/boot/efi",
    "fs.1.fstype": "vfat",
}
ADDRESSES = {
    "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"addr": "127.0.0.1", "prefix": 8}]},
    "eth0": {
        "hwaddr": "0E:12:34:56:78:9A",
        "addrs": [
            {"addr": "fe80::c12:34ff:fe56:789a", "prefix": 64, "type": 1},
            {"addr": "fd00::5", "prefix": 64, "type": 1},
            {"addr": "10.83.0.2", "prefix": 24, "type": 0},
        ],
    },
}


def test_os_hostname_filesystems_and_addresses_are_read() -> None:
    report = report_from(INFO, ADDRESSES)
    assert report.connected
    assert (report.os_id, report.os_pretty_name, report.kernel_release, report.hostname) == (
        "debian",
        "Debian GNU/Linux 12 (bookworm)",
        "6.1.0-57-cloud-amd64",
        "bookworm",
    )
    assert report.filesystems == (
        AgentFilesystem("/", "ext4"),
        AgentFilesystem("/boot/efi", "vfat"),
    )
    # No loopback, no link-local; IPv4 first; MACs lower case (status's).
    assert report.interfaces == (
        AgentInterface("eth0", "0e:12:34:56:78:9a", ("10.83.0.2", "fd00::5")),
    )


def test_an_agent_with_little_to_say_is_still_connected() -> None:
    report = report_from({}, {})
    assert report.connected
    assert report.os_name is None
    assert report.interfaces == ()


def test_the_channel_state_comes_from_the_live_xml() -> None:
    def xml(state: str) -> str:
        return (
            "<domain><devices><channel type='unix'><target type='virtio' "
            f"name='org.qemu.guest_agent.0' {state}/></channel></devices></domain>"
        )

    assert channel_connected(xml("state='connected'"))
    assert not channel_connected(xml("state='disconnected'"))
    assert not channel_connected(xml(""))
    assert not channel_connected("<domain><devices/></domain>")
