"""libvirt's bulk statistics read as base units, devices named as the spec names them."""

from __future__ import annotations

from virtfleet.domain.stats import DeviceNames, device_names, usage_from_stats

#: What libvirt 9.0 answers for a running harness guest (trimmed: the groups virtfleet asks).
STATS = {
    "cpu.time": 12_500_000_000,
    "cpu.user": 2_000_000_000,
    "cpu.system": 9_000_000_000,
    "vcpu.current": 1,
    "balloon.current": 131072,
    "balloon.rss": 90_000,
    "block.count": 2,
    "block.0.name": "vda",
    "block.0.wr.bytes": 4096,
    "block.0.wr.reqs": 8,
    "block.0.wr.times": 1_500_000_000,
    "block.0.rd.bytes": 512,
    "block.1.name": "vdb",
    "net.count": 2,
    "net.0.name": "vnet3",
    "net.0.rx.bytes": 1000,
    "net.0.tx.pkts": 7,
    "net.1.name": "",
}
LIVE = """<domain type='qemu'><name>ns_vm</name><devices>
  <disk type='file' device='disk'><target dev='vda' bus='virtio'/>
    <alias name='ua-disk-data'/></disk>
  <disk type='file' device='disk'><target dev='vdb' bus='virtio'/>
    <alias name='ua-cloudinit'/></disk>
  <interface type='network'><target dev='vnet3'/><alias name='ua-nic-lan'/></interface>
</devices></domain>"""


def test_counters_in_base_units_and_spec_names() -> None:
    names = device_names(LIVE)
    assert names == DeviceNames(disks={"vda": "data"}, nics={"vnet3": "lan"})
    usage = usage_from_stats(STATS, names)
    assert usage.cpu_seconds == 12.5
    assert (usage.cpu_user_seconds, usage.cpu_system_seconds) == (2.0, 9.0)
    assert usage.memory_domain_bytes == 128 * 2**20
    assert usage.memory_resident_bytes == 90_000 * 1024
    assert usage.memory_available_bytes is None  # no guest agent, no balloon driver: unsaid
    data, seed = usage.blocks
    assert (data.name, data.write_bytes, data.write_requests, data.write_seconds) == (
        "data", 4096, 8, 1.5,
    )  # fmt: skip
    assert seed.name == "vdb"  # not a spec disk: libvirt's name
    (lan,) = usage.nets  # the unnamed one is skipped
    assert (lan.name, lan.receive_bytes, lan.transmit_packets) == ("lan", 1000, 7)


def test_nothing_said_is_nothing_reported() -> None:
    usage = usage_from_stats({})
    assert usage.cpu_seconds is None
    assert usage.blocks == ()
    assert usage.nets == ()
    assert usage_from_stats({"cpu.time": "junk", "block.count": True}).cpu_seconds is None
