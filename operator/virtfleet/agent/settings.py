"""Settings of one node agent, as a documented frozen dataclass (kopf's style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from virtfleet.agent.network import NetworkPolicy
from virtfleet.hypervisor.download import DEFAULT_DENIED_CIDRS
from virtfleet.identity import node_finalizer

#: How long one run of a kopf deletion handler (VM, VMSnapshot, VMMigration) waits for
#: the agent's running job on the object to end; then it raises ``kopf.TemporaryError``
#: and kopf retries it (the finalizer stays until the job is done).
DELETE_WAIT_SECONDS = 20.0


@dataclass(frozen=True)
class AgentSettings:
    #: The Kubernetes Node this agent serves; VMs labelled ``virtfleet.io/node=<node>``.
    node_name: str
    #: libvirt URI of this node's hypervisor.
    libvirt_uri: str = "qemu:///system"
    #: How other nodes reach this node's libvirtd (published in VMHost ``migrationURI``;
    #: a migration's source agent and libvirtd connect to it). None: ``libvirt_uri``,
    #: right only where that already names this node from elsewhere (not ``qemu:///system``).
    migration_uri: str | None = None
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
    #: Address ranges (CIDRs) ``source.http`` downloads may not connect to: every address
    #: a host resolves to is checked, for the first request and each redirect, and the
    #: connection goes to the checked address. Default: loopback, link-local, unspecified.
    http_deny_cidrs: tuple[str, ...] = DEFAULT_DENIED_CIDRS
    #: Exceptions carved out of ``http_deny_cidrs`` (e.g. a harness's image server on
    #: 127.0.0.1).
    http_allow_cidrs: tuple[str, ...] = ()
    #: A label (``key=value``, or ``key`` for any value) a Secret must carry to be used as
    #: ``cloudInit.userDataSecretRef``: its owner opts in, so a user who may create VMs
    #: but not read Secrets cannot copy one into a guest. None: any Secret of the VM's
    #: namespace (as KubeVirt).
    cloud_init_secret_label: str | None = None
    #: Longest watch request (the apiserver picks 30-60 min when None); shorter means
    #: the agent re-establishes its watches more often.
    watch_server_timeout: float | None = None
    #: Seconds without the VMHost echo before the liveness probe says "deaf"
    #: (None: :func:`virtfleet.agent.health.stale_after` derives it from the heartbeat).
    watch_stale_seconds: float | None = None
    #: Namespace of this agent's heartbeat Lease ``virtfleet-agent-<node>``.
    lease_namespace: str = "kube-node-lease"
    #: The Lease's ``leaseDurationSeconds``: silent this long, the node counts as failed.
    lease_seconds: float = 10.0
    #: How often the Lease is renewed.
    lease_renew_seconds: float = 2.0
    #: Destroy HA VMs' domains when the Lease could not be renewed this long (None: never;
    #: then the controller never fences the node automatically). Keep it ≤ lease_seconds.
    self_fence_after: float | None = 10.0
    #: A watchdog device the agent pets while it holds HA VMs (``/dev/watchdog`` with
    #: softdog or a hardware watchdog); None: none. Without one the node is not fenced
    #: automatically (an agent that dies cannot stop its QEMUs).
    watchdog_path: str | None = None
    #: The device's timeout (set on the device, e.g. ``softdog soft_margin``): declared in
    #: the Lease, so the controller knows when a silent node has reset.
    watchdog_timeout_seconds: float = 30.0
    #: What VMs' NICs may reach on this node (allowed bridges and networks, nwfilter,
    #: the user-NIC firewall): see :mod:`virtfleet.agent.network`.
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    #: This node's underlay address: its VXLAN endpoint for VMNetworks (VMHost
    #: ``status.tunnelAddress``, where the other nodes send). None: no VMNetworks here.
    tunnel_address: str | None = None
    #: How often each running VM's qemu-guest-agent is asked for OS, addresses and
    #: filesystems (status.guestOSInfo, status.interfaces, AgentConnected).
    guest_agent_poll_seconds: float = 30.0
    #: A guest whose agent says it is frozen this long is thawed (a freeze for a quiesced
    #: snapshot lasts seconds; one nobody thawed would hang the guest's writes for ever).
    guest_thaw_after_seconds: float = 300.0
    #: Ranges VMNetwork NAT gateways never reach, besides link-local, the nodes and
    #: whatever is DNAT'd: the cluster's pod, Service and node networks (they would see
    #: the VM's connections as the node's).
    nat_deny_cidrs: tuple[str, ...] = ()
    #: Where the VMNetworks' DHCP servers keep their files (a tmpfs: gone with a reboot,
    #: like the servers). Must be searchable by everybody (dnsmasq re-reads as nobody).
    network_state_dir: str = "/run/virtfleet/networks"
    #: ``host:port`` of ``/metrics`` (Prometheus); None: no metrics endpoint.
    metrics_listen: str | None = None
    #: How often the VMs' usage is read (one bulk libvirt call); scrapes read the result.
    metrics_interval_seconds: float = 15.0
    #: ``host:port`` the console endpoint (``virtfleet console``) listens on; None: no
    #: console on this node.
    console_listen: str | None = None
    #: The address clients connect to (in the VMs' ``status.consoleEndpoint``); None: the
    #: listen address (which must then be a specific one).
    console_advertise: str | None = None

    @property
    def finalizer(self) -> str:
        return node_finalizer(self.node_name)

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.default_pool, *self.disk_pools)))
