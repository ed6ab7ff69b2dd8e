"""The agent's hands on its node: observe a VM's domain, and carry out decided actions.

Everything that needs libvirt for one VM is here, between two pure layers: the
reconcile decisions above (which never see libvirt) and the hypervisor adapter below
(which never sees the API models). Names become host paths only here, and only by
asking libvirt where a pool's volume lives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import posixpath
from dataclasses import dataclass

from virtfleet.agent import httpdisk, network, volumes
from virtfleet.agent.backupdisk import BackupDisks
from virtfleet.agent.errors import ActionError as ActionError  # re-exported: tests, callers
from virtfleet.agent.guestfirewall import GUEST_FIREWALL_UNAVAILABLE, GuestFirewall
from virtfleet.agent.observations import ObservationMemo
from virtfleet.agent.settings import AgentSettings
from virtfleet.agent.vmnetworks import NetworkKeeper
from virtfleet.agent.volumes import SEED, seed_volume_name, volume_name
from virtfleet.api.virtualmachine import Disk, VirtualMachineSpec
from virtfleet.domain import (
    DiskBacking,
    DomainInputs,
    NodeResources,
    build_domain,
    domain_name,
    render_xml,
    spec_hash,
)
from virtfleet.domain.config import BandwidthConfig
from virtfleet.domain.errors import DomainError
from virtfleet.domain.observe import observe_config
from virtfleet.hypervisor import Guest, GuestState, Hypervisor, storage
from virtfleet.hypervisor import errors as hv_errors
from virtfleet.logs import get_logger
from virtfleet.reconcile.vm import (
    Action,
    ApplyLive,
    Define,
    DeleteVolumes,
    EnsureVolumes,
    Observed,
    Pause,
    Power,
    Resume,
    Start,
    Stop,
    StopCause,
    Undefine,
    VmView,
)

_STOP_CAUSES = {
    "shutdown": StopCause.GUEST,
    "destroyed": StopCause.DESTROYED,
    "crashed": StopCause.CRASHED,
    "failed": StopCause.FAILED,
    "migrated": StopCause.MIGRATED,
    "saved": StopCause.SAVED,
    "from-snapshot": StopCause.SNAPSHOT,
}


#: Ready/Reconciling reason while libvirtd keeps the domain's job lock (see ``JobStuck``).
JOB_STUCK = "HypervisorJobStuck"


def job_stuck_message(error: str, node: str, domain: str) -> str:
    """What the user reads in ``kubectl describe``: what is wrong, and what clears it.

    Restarting libvirtd clears an ownerless job only when QEMU died with it; when QEMU
    survived, libvirtd reconnects to it and keeps the job, and only ending that QEMU
    clears it (the guest is restarted per ``runStrategy``). When libvirtd died while it
    forked QEMU, no QEMU exists and the status file (``pid='0'``, async job ``start``)
    brings the job back on every restart: only removing that file while libvirtd is
    stopped clears it (chaos seed 1284366246).
    """
    status = f"/run/libvirt/qemu/{domain}"
    return (
        f"{error}: libvirtd on {node} holds a job on this domain. If it lasts, libvirtd "
        "kept a job without owner after it crashed during a start or a snapshot revert "
        f"(libvirt 9): restart libvirtd on {node}; if the job survives that, kill the "
        f"domain's QEMU on {node} (kill $(cat {status}.pid)); if it has no QEMU, stop "
        f"libvirtd, remove {status}.xml and start libvirtd again. virtfleet retries and "
        "starts the VM again per its runStrategy"
    )


_log = get_logger("virtfleet.agent.driver")

#: Pause reasons of a domain libvirt was starting or reverting when its job got stuck.
HALF_STARTED = frozenset({"starting-up", "from-snapshot"})


@dataclass(frozen=True)
class VmObservation:
    """One observation of a VM's domain on this node (not a VM snapshot).

    ``observed`` is the reduced view the decision reads; the rest is what acting on the
    decision needs.
    """

    observed: Observed
    inputs: DomainInputs | None
    guest: Guest | None
    secret_user_data: str | None = None


def _bandwidth_params(bandwidth: BandwidthConfig | None) -> dict[str, int]:
    params: dict[str, int] = {}
    for direction in ("inbound", "outbound"):
        limit = getattr(bandwidth, direction, None) if bandwidth else None
        if limit is not None:
            params[f"{direction}.average"] = limit.average
            params[f"{direction}.peak"] = limit.peak or 0
            params[f"{direction}.burst"] = limit.burst or 0
    return params


def _hypervisor_failure(exc: hv_errors.HypervisorError) -> ActionError:
    """A libvirt error as the reason the VM's conditions carry (the loop survives it)."""
    if isinstance(exc, hv_errors.UnsafeImage | hv_errors.InvalidDefinition):
        return ActionError(type(exc).__name__, str(exc), permanent=True)
    if isinstance(exc, hv_errors.ConnectionLost):
        return ActionError("HypervisorUnavailable", str(exc), permanent=False)
    if '"write" lock' in str(exc) or "resource busy" in str(exc).lower():
        return ActionError(
            DISK_LOCKED,
            "a disk of the VM is locked by another process: another copy of this VM may "
            "still run (e.g. on a failed node that is not powered off yet); the start is "
            f"retried. libvirt: {exc}",
            permanent=False,
        )
    return ActionError(type(exc).__name__, str(exc), permanent=False)


#: The reason of a start refused by a disk lock (QEMU's image locking, libvirt's lock
#: manager): the lease layer of fencing at work (docs/failover.md).
DISK_LOCKED = "DiskLocked"


def power_of(state: GuestState, reason: str) -> tuple[Power, StopCause]:
    match state:
        case GuestState.RUNNING | GuestState.BLOCKED:
            return Power.RUNNING, StopCause.NONE
        case GuestState.PAUSED | GuestState.PMSUSPENDED:
            return Power.PAUSED, StopCause.NONE
        case GuestState.SHUTDOWN:
            return Power.STOPPING, StopCause.NONE
        case GuestState.CRASHED:
            return Power.CRASHED, StopCause.CRASHED
        case _:
            return Power.STOPPED, _STOP_CAUSES.get(reason, StopCause.NONE)


class NodeDriver:
    """Observe and act for VMs on one node, through one hypervisor connection."""

    def __init__(self, hv: Hypervisor, settings: AgentSettings) -> None:
        self.hv = hv
        self.settings = settings
        self.http_policy = httpdisk.policy_of(settings)
        self.firewall = GuestFirewall(settings.node_name, settings.network)
        #: Restores ``source.backup`` disks; set by the agent, which has the API client.
        self.backup_disks: BackupDisks | None = None
        #: The node's VMNetworks (where ``type: network`` NICs plug in); set by the agent.
        self.networks: NetworkKeeper | None = None
        self.observations = ObservationMemo()

    # --- observing ------------------------------------------------------------------------

    async def observe(self, vm: VmView, user_data: str | None = None) -> VmObservation:
        """What is on the node for ``vm``; raises ActionError when the spec cannot be placed."""
        try:
            try:
                observation = await self._observe(vm, user_data)
            except hv_errors.NotFound:
                # The domain went away between two calls (undefined meanwhile): look again.
                observation = await self._observe(vm, user_data)
        except hv_errors.HypervisorError as exc:
            raise _hypervisor_failure(exc) from exc
        return dataclasses.replace(observation, secret_user_data=user_data)

    async def _observe(self, vm: VmView, user_data: str | None) -> VmObservation:
        guest = await self.hv.lookup(vm.uid)
        spec = vm.spec
        if spec is None or vm.deleting:
            # Deleting needs no resolved resources: a VM whose image vanished must still go.
            return VmObservation(await self._bare(guest), None, guest)

        inputs, missing = await self._resolve(vm, spec, user_data)
        if guest is None:
            self.observations.forget(vm.uid)
            return VmObservation(Observed(defined=False, missing_volumes=missing), inputs, None)

        status = await guest.status()
        power, cause = power_of(status.state, status.reason)
        seen = self.observations.inactive(vm.uid, inputs, await guest.xml(inactive=True))
        inactive = seen.observed
        if inactive.owner is None:
            raise ActionError(
                "ForeignDomain",
                f"domain {inactive.name!r} has this VM's UUID but no virtfleet owner marker; "
                "it is left alone",
                permanent=True,
            )
        drift = seen.drift
        marker_current = (
            inactive.owner.generation == vm.generation
            and inactive.owner.spec_hash == spec_hash(spec)
        )
        live: tuple[str, ...] = ()
        restart: tuple[str, ...] = ()
        if power in (Power.RUNNING, Power.PAUSED):
            running = self.observations.running(vm.uid, seen.desired, await guest.xml())
            live = tuple(c.path for c in running.live)
            restart = tuple(c.path for c in running.restart)
        return VmObservation(
            Observed(
                defined=True,
                persistent=await guest.is_persistent(),
                power=power,
                stop_cause=cause,
                drift=drift.paths,
                marker_current=marker_current,
                live_changes=live,
                restart_changes=restart,
                missing_volumes=missing,
            ),
            inputs,
            guest,
        )

    async def _bare(self, guest: Guest | None) -> Observed:
        if guest is None:
            return Observed(defined=False)
        status = await guest.status()
        power, cause = power_of(status.state, status.reason)
        return Observed(defined=True, power=power, stop_cause=cause)

    async def _resolve(
        self, vm: VmView, spec: VirtualMachineSpec, user_data: str | None
    ) -> tuple[DomainInputs, tuple[str, ...]]:
        """Host paths for every name in the spec, and which volumes do not exist yet."""
        self._check_network(vm, spec)
        attached = self.networks.attach(vm.namespace, vm.uid, spec) if self.networks else {}
        disks: dict[str, DiskBacking] = {}
        missing: list[str] = []
        for disk in spec.disks:
            pool = self._pool_for(disk)
            name = volume_name(vm.uid, disk.name)
            volume = await storage.lookup_volume(self.hv, pool, name)
            path = volume.path if volume is not None else await self._path_in(pool, name)
            if volume is None:
                missing.append(disk.name)
                if disk.source.http is not None:
                    httpdisk.check_url(disk)
            disks[disk.name] = DiskBacking(path=path, format="qcow2")

        kernel = initrd = seed = None
        if spec.kernel is not None:
            kernel = await self._image_path(spec.kernel.image)
            if spec.kernel.initrd is not None:
                initrd = await self._image_path(spec.kernel.initrd)
        if spec.cloud_init is not None:
            name = seed_volume_name(vm.uid)
            volume = await storage.lookup_volume(self.hv, self.settings.default_pool, name)
            seed = volume.path if volume else await self._path_in(self.settings.default_pool, name)
            if volume is None:
                missing.append(SEED)

        resources = NodeResources(
            disks=disks,
            serial_log=posixpath.join(
                self.settings.serial_log_dir, f"{domain_name(vm.namespace, vm.name)}.log"
            ),
            kernel=kernel,
            initrd=initrd,
            cloud_init_seed=seed,
            networks=attached,
        )
        try:
            inputs = DomainInputs(
                namespace=vm.namespace,
                name=vm.name,
                uid=vm.uid,
                generation=vm.generation,
                spec=spec,
                resources=resources,
                domain_type=self.settings.domain_type,
                nwfilter=self.settings.network.nwfilter,
            )
            if not self.observations.rendered(vm.uid, inputs):
                build_domain(inputs)  # refuse what cannot be rendered before anything is made
        except DomainError as exc:
            raise ActionError("InvalidSpec", str(exc), permanent=True) from exc
        return inputs, tuple(missing)

    def _check_network(self, vm: VmView, spec: VirtualMachineSpec) -> None:
        """NICs the node admin does not allow, or that cannot be fenced yet, make nothing."""
        why = network.refusal(vm.namespace, spec, self.settings.network)
        if why is not None:
            raise ActionError(network.NETWORK_NOT_ALLOWED, why, permanent=True)
        if network.needs_firewall(spec, self.settings.network) and not self.firewall.ready:
            raise ActionError(
                GUEST_FIREWALL_UNAVAILABLE,
                f"a user NIC needs the guest firewall, which is not in place on node "
                f"{self.settings.node_name}: {self.firewall.error} (or the node admin opts in "
                "with the agent's --user-nic-host-access, chart value "
                "agent.network.userNicHostAccess)",
                permanent=True,
            )

    def _pool_for(self, disk: Disk) -> str:
        return volumes.pool_for(self.settings, disk)

    async def _path_in(self, pool: str, name: str) -> str:
        try:
            info = await storage.pool_info(self.hv, pool)
        except hv_errors.NotFound as exc:
            raise ActionError(
                "PoolNotFound",
                f"storage pool {pool!r} does not exist on node {self.settings.node_name}",
                permanent=True,
            ) from exc
        if info.path is None:
            raise ActionError("PoolNotFound", f"pool {pool!r} has no path", permanent=True)
        return posixpath.join(info.path, name)

    async def _image_path(self, image: str) -> str:
        volume = await storage.lookup_volume(self.hv, self.settings.image_pool, image)
        if volume is None:
            raise ActionError(
                "ImageNotFound",
                f"image {image!r} is not in node {self.settings.node_name}'s image store",
                permanent=True,
            )
        return volume.path

    # --- acting ---------------------------------------------------------------------------

    async def execute(self, vm: VmView, observation: VmObservation, action: Action) -> None:
        """Carry out one action; hypervisor errors become ActionError with a reason."""
        try:
            await self._execute(vm, observation, action)
        except ActionError:
            raise
        except hv_errors.JobStuck as exc:
            await self._kill_half_started(vm)
            raise ActionError(
                JOB_STUCK,
                job_stuck_message(str(exc), vm.node, domain_name(vm.namespace, vm.name)),
                permanent=False,
            ) from exc
        except hv_errors.HypervisorError as exc:
            raise _hypervisor_failure(exc) from exc

    async def _kill_half_started(self, vm: VmView) -> None:
        """A domain stuck paused half-way through a start or revert is no guest: kill it.

        libvirtd's destroy kills QEMU *before* it waits for the job lock, so even when
        the call then times out the process is gone, and the libvirtd restart the
        message asks for finds nothing to reconnect to and frees the domain. A running
        guest, or one a user paused, is never killed here.
        """
        with contextlib.suppress(hv_errors.HypervisorError):
            guest = await self.hv.lookup(vm.uid)
            if guest is None:
                return
            status = await guest.status()
            if status.state is GuestState.PAUSED and status.reason in HALF_STARTED:
                _log.warning("killing a half-started domain", namespace=vm.namespace, vm=vm.name)
                await guest.destroy()

    async def _execute(self, vm: VmView, observation: VmObservation, action: Action) -> None:
        match action:
            case EnsureVolumes(names=names):
                assert vm.spec is not None
                await volumes.ensure_volumes(
                    self.hv,
                    self.settings,
                    self.http_policy,
                    vm,
                    vm.spec,
                    names,
                    observation.secret_user_data,
                    self.backup_disks,
                    self.networks.network_config(vm.uid, vm.spec) if self.networks else None,
                )
            case Define():
                assert observation.inputs is not None
                await self._networks_up(observation.inputs)
                await self.hv.define(render_xml(observation.inputs))
            case Start():
                guest = observation.guest or await self.hv.lookup(vm.uid)
                if guest is not None:
                    if observation.inputs is not None:
                        await self._networks_up(observation.inputs)
                    await guest.start()
            case Stop(grace_seconds=grace):
                if observation.guest is not None:
                    stop = await self.hv.graceful_stop(observation.guest, grace)
                    _log.info(
                        "domain stopped",
                        namespace=vm.namespace,
                        vm=vm.name,
                        path=stop.path.value,
                        asked=stop.asked,
                        seconds=stop.waited_seconds,
                    )
            case Undefine():
                if observation.guest is not None:
                    await observation.guest.undefine()
            case DeleteVolumes():
                await self.delete_volumes(vm.uid)
            case Pause():
                if observation.guest is not None:
                    await observation.guest.suspend()
            case Resume():
                if observation.guest is not None:
                    await observation.guest.resume()
            case ApplyLive(paths=paths):
                assert observation.inputs is not None
                assert observation.guest is not None
                await self._apply_live(observation.guest, observation.inputs, paths)

    async def _networks_up(self, inputs: DomainInputs) -> None:
        """The bridges a domain plugs into exist before libvirt makes its taps."""
        if self.networks is not None and inputs.resources.networks:
            await self.networks.ensure(inputs.resources.networks)

    async def _apply_live(self, guest: Guest, inputs: DomainInputs, paths: tuple[str, ...]) -> None:
        """iotune and bandwidth changes on the running domain, from the desired config."""
        desired = observe_config(build_domain(inputs))
        for path in paths:
            kind, _, rest = path.partition("[")
            name = rest.split("]", 1)[0]
            if kind == "disks" and path.endswith(".iotune"):
                disk = desired.disk(name)
                if disk is not None:
                    limits = disk.iotune.limits() if disk.iotune else {}
                    await guest.set_block_iotune(disk.target, limits)
            elif kind == "interfaces" and path.endswith(".bandwidth"):
                nic = desired.interface(name)
                if nic is not None and nic.mac is not None:
                    await guest.set_interface_bandwidth(nic.mac, _bandwidth_params(nic.bandwidth))

    async def delete_volumes(self, uid: str) -> list[str]:
        """Every volume of the VM with ``uid`` in the agent's pools (also half-made ones)."""
        return await volumes.delete_volumes(self.hv, self.settings, uid)
