"""Settings of one node agent, as a documented frozen dataclass (kopf's style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from virtfleet.identity import node_finalizer


@dataclass(frozen=True)
class AgentSettings:
    #: The Kubernetes Node this agent serves; VMs labelled ``virtfleet.io/node=<node>``.
    node_name: str
    #: libvirt URI of this node's hypervisor.
    libvirt_uri: str = "qemu:///system"
    #: ``kvm`` where /dev/kvm works, ``qemu`` (TCG) where it does not (nested virt).
    domain_type: Literal["qemu", "kvm"] = "qemu"
    #: Pool that is the node's image store: images and kernels are names in it.
    image_pool: str = "virtfleet-images"
    #: Pool for disks that name no pool.
    default_pool: str = "virtfleet-local"
    #: Every pool whose volumes the agent may create and delete for VMs.
    disk_pools: tuple[str, ...] = ("virtfleet-local",)
    #: Pools (among ``disk_pools``) that every node sees at the same path: a migration
    #: leaves their disks in place instead of copying them, and never deletes them.
    shared_pools: tuple[str, ...] = ()
    #: Directory (on the node) where guests' serial consoles are written.
    serial_log_dir: str = "/var/log/libvirt/virtfleet-serial"
    #: Reconciles running at once (each holds one VM; long stops hold a worker).
    workers: int = 8
    #: Every VM is looked at again this often, events or not.
    resync_seconds: float = 60.0
    #: How often VMHost's heartbeat is renewed.
    heartbeat_seconds: float = 10.0
    #: Largest download for ``source.http`` disks (a disk's own ``size`` lowers it).
    http_max_bytes: int = 16 * 2**30
    #: Local directory where ``source.http`` downloads are spooled and verified before
    #: they are streamed into the pool (None: the system's temporary directory).
    download_dir: str | None = None
    #: Longest watch request (the apiserver picks 30-60 min when None); shorter means
    #: the agent re-establishes its watches more often.
    watch_server_timeout: float | None = None
    #: Seconds without the VMHost echo before the liveness probe says "deaf"
    #: (None: :func:`virtfleet.agent.health.stale_after` derives it from the heartbeat).
    watch_stale_seconds: float | None = None

    @property
    def finalizer(self) -> str:
        return node_finalizer(self.node_name)

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.default_pool, *self.disk_pools)))
