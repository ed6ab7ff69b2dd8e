"""Pure decisions of a running VMMigration job: each poll, its end, and its recovery.

The source agent's job loop is observe → decide → act like the VM loop
(:func:`virtfleet.reconcile.vm.decide`): every second it hands a ``jobStats()`` sample
to :func:`decide_poll` (abort for the completion timeout? switch to post-copy? publish
progress?), and when the job returns it hands where the domain is now to
:func:`decide_job_end` (hand over, fail with a reason, or leave it to the recovery).
An agent that restarted mid-job asks :func:`decide_recovery`. Whether a job succeeded
is decided by where the domain runs, not by the job type, which reads ``NONE`` right
after a job ended (DESIGN §6, Nova's ``libvirt/migration.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from virtfleet.api.migration import MigrationMode, MigrationPhase, MigrationProgress
from virtfleet.api.virtualmachine import PrintableStatus
from virtfleet.domain.jobs import JobProgress

#: Publish progress at most this often (each publication is one status PATCH).
PROGRESS_INTERVAL_SECONDS = 1.5
#: jobStats() poll period while the job runs.
POLL_SECONDS = 1.0
#: A recovery whose outcome is unclear (a job may still run in libvirtd) looks again.
RECOVERY_RETRY_SECONDS = 5.0
#: Pre-copy gets this many memory iterations before a stall can switch it to post-copy.
POSTCOPY_AFTER_ITERATION = 3
GIB = 2**30


class JobOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: Running on both nodes or on neither: not safe to call either way yet.
    UNCLEAR = "unclear"
    #: The vCPUs run on both nodes: libvirt gave the job up and resumed the source, yet
    #: the target's copy runs too (see :func:`job_outcome`). The target's copy must go.
    SPLIT = "split"


class EndReason(StrEnum):
    """``failureReason`` prefixes (and Stalled reasons) a job can end with."""

    CANCELLED = "Cancelled"
    COMPLETION_TIMEOUT = "CompletionTimeout"
    MIGRATION_FAILED = "MigrationFailed"
    #: Failed after the switch to post-copy: the guest is lost (see :func:`decide_job_end`).
    POSTCOPY_FAILED = "PostCopyFailed"
    INTERRUPTED = "Interrupted"
    TARGET_UNAVAILABLE = "TargetUnavailable"


@dataclass
class JobState:
    """What this process learnt about one job while it ran (one per job, nothing else)."""

    #: The VMMigration was deleted: the job was asked to abort.
    cancelled: bool = False
    #: The budget in seconds, once the job was aborted for ``completionTimeoutPerGiB``.
    timed_out_budget: float | None = None
    #: The job switched to post-copy (a failure then loses the guest).
    post_copied: bool = False
    #: The abort for the completion timeout was accepted by libvirt.
    aborted: bool = False
    #: ``(memory iteration, memory remaining)`` samples, for :func:`postcopy_due`.
    samples: list[tuple[int, int]] = field(default_factory=list)


# --- the end of a job ------------------------------------------------------------------


@dataclass(frozen=True)
class HandOver:
    """The guest runs on the target: give the VM to it."""


@dataclass(frozen=True)
class Recover:
    """Stay ``Running``; the recovery decides by where the domain is (after ``delay``)."""

    delay: float = 0.0


@dataclass(frozen=True)
class Fail:
    """End the VMMigration for good with ``reason``; the VM stays on the source."""

    reason: EndReason | str
    message: str
    phase: MigrationPhase = MigrationPhase.FAILED
    #: Let the VM loop look again (it reports the VM Running here again).
    release_vm: bool = True
    #: A VM ``printableStatus`` to write instead of releasing the VM.
    vm_printable: PrintableStatus | None = None
    #: Destroy the copy libvirt left running on the target first (an outcome ``SPLIT``).
    remove_target_copy: bool = False


JobEnd = HandOver | Recover | Fail


def job_outcome(where: DomainWhere, *, handed_over: bool = False) -> JobOutcome:
    """Decided by where the domain runs (and, for a split, by ``handed_over``: whether
    the VM's ``status.nodeName`` already names the target).

    With ``UNDEFINE_SOURCE`` and ``PERSIST_DEST`` a finished migration leaves the domain
    running on the target only; an aborted or failed one leaves it running on the
    source. A source libvirtd that died between the switch-over and the confirmation
    leaves its copy paused (libvirt's ``perform3_done`` recovery waits for "a third
    party"): the target runs the guest, so that is a success too, and the paused
    left-over is the hand-over's to remove.

    vCPUs running on *both* nodes is never a stage of a job (pre-copy keeps the target
    paused until the source paused; post-copy pauses the source before the target
    runs): it is libvirt's own split. A source libvirtd whose ``Finish3`` call to the
    target was lost treats the job as failed and resumes the source, while the target
    had already started its vCPUs — its restart keeps them running ("There is a small
    chance that the ddomain is NULL due to an RPC failure, in which case ddomain could
    in fact be running on the dest", ``qemuMigrationSrcPerformPeer2Peer3``; only a
    lock manager would stop it); a source libvirtd restarted mid-job resumes a copy it
    finds paused too. The copy the API names wins, at once: while ``status.nodeName``
    names the source, libvirt's verdict — failed — stands and the target's copy is
    removed; once a hand-over committed the target, it is a success and the source's
    copy is the left-over. Anything else (active on both or on neither) is not safe to
    call either way.
    """
    if where.target_active and not where.source_active:
        return JobOutcome.SUCCEEDED
    if where.target_running and where.source_paused_by_migration:
        return JobOutcome.SUCCEEDED
    if where.source_active and not where.target_active:
        return JobOutcome.FAILED
    if where.source_running and where.target_running:
        return JobOutcome.SUCCEEDED if handed_over else JobOutcome.SPLIT
    return JobOutcome.UNCLEAR


def offline_outcome(where: DomainWhere) -> JobOutcome:
    """The outcome of an interrupted *offline* migration.

    The offline job defines the domain on the target only after every volume was
    copied, and undefines it here only after that: a definition on the target with
    nothing running here means the copy is complete (the source definition, if still
    there, is a left-over to undefine). No definition on the target means the job
    stopped before its end: the VM stays here (its VM loop starts it per run strategy).
    """
    if where.on_target and not where.source_active and not where.target_active:
        return JobOutcome.SUCCEEDED
    if where.on_target and where.target_active and not where.source_active:
        return JobOutcome.SUCCEEDED  # the target agent already started it
    if where.on_source and not where.on_target:
        return JobOutcome.FAILED
    return JobOutcome.UNCLEAR


@dataclass(frozen=True)
class DomainWhere:
    """Where the VM's domain is after a job ended (or after a restart found no job)."""

    on_source: bool
    source_active: bool
    on_target: bool
    target_active: bool
    #: The source is paused because its migration completed (reason ``migration``, not
    #: post-copy): QEMU stopped its vCPUs at the switch-over.
    source_paused_by_migration: bool = False
    #: The target's vCPUs run (not an incoming domain still paused).
    target_running: bool = False
    #: The source's vCPUs run (not paused by the migration, a user or post-copy).
    source_running: bool = False


def decide_job_end(
    outcome: JobOutcome,
    state: JobState,
    error: str | None,
    *,
    timeout_per_gib: int | None = None,
) -> JobEnd:
    """What to do once ``migrateToURI3`` returned and the domain was looked up.

    Order matters: a success wins over everything (the guest already runs there); a
    post-copy job that did not succeed lost the guest whatever else happened (memory is
    split between both nodes: never resume or restart it anywhere); an unclear outcome
    is never called failed (the VM loop would start a second copy).
    """
    if outcome is JobOutcome.SUCCEEDED:
        return HandOver()
    if state.post_copied:
        return Fail(
            EndReason.POSTCOPY_FAILED,
            postcopy_failure_message(error),
            release_vm=False,
            vm_printable=PrintableStatus.FAILED,
        )
    if outcome is JobOutcome.UNCLEAR:
        return Recover()
    end = _failed_job(state, error, timeout_per_gib)
    return split_end(end) if outcome is JobOutcome.SPLIT else end


def _failed_job(state: JobState, error: str | None, timeout_per_gib: int | None) -> Fail:
    if state.cancelled:
        return Fail(EndReason.CANCELLED, "deleted while running", phase=MigrationPhase.CANCELLED)
    if state.timed_out_budget is not None:
        return Fail(
            EndReason.COMPLETION_TIMEOUT,
            f"completion timeout of {state.timed_out_budget:.2f}s exceeded "
            f"({timeout_per_gib}s per GiB of RAM and copied disk): job aborted, "
            "the VM stays on the source",
        )
    return Fail(EndReason.MIGRATION_FAILED, error or "the job ended; VM stays")


def split_end(end: Fail) -> Fail:
    """A failed job whose target copy runs as well: that copy is destroyed first."""
    return replace(
        end,
        message=f"{end.message}; libvirt resumed the guest on the source while its copy "
        "on the target ran too: the target's copy was destroyed",
        remove_target_copy=True,
    )


def decide_job_error(error: str, *, job_began: bool) -> JobEnd:
    """libvirt failed (a connection lost) around the job, not the job itself.

    Before the job began nothing moved: the target is unavailable. Once it began,
    libvirt may have finished it and undefined the domain here; calling it failed would
    let the VM loop start a second copy, so the recovery decides once both answer.
    """
    if job_began:
        return Recover()
    return Fail(EndReason.TARGET_UNAVAILABLE, error)


def decide_recovery(outcome: JobOutcome) -> JobEnd:
    """``Running`` with no job in this process (the agent restarted): decide by the domain."""
    if outcome is JobOutcome.SUCCEEDED:
        return HandOver()
    if outcome is JobOutcome.FAILED:
        return Fail(EndReason.INTERRUPTED, "the agent restarted during the job")
    if outcome is JobOutcome.SPLIT:
        return split_end(Fail(EndReason.INTERRUPTED, "the agent restarted during the job"))
    return Recover(delay=RECOVERY_RETRY_SECONDS)


class OfflineStop(StrEnum):
    """Why an offline job stopped before its hand-over."""

    CANCELLED = "cancelled"
    REFUSED = "refused"
    HYPERVISOR_ERROR = "hypervisor-error"


def decide_offline_stop(stop: OfflineStop, message: str, *, reason: str | None = None) -> Fail:
    """An offline job that stopped early: the VM stays (and starts) on the source."""
    if stop is OfflineStop.CANCELLED:
        return Fail(EndReason.CANCELLED, "deleted while running", phase=MigrationPhase.CANCELLED)
    if stop is OfflineStop.REFUSED:
        return Fail(reason or EndReason.MIGRATION_FAILED, message)
    return Fail(EndReason.MIGRATION_FAILED, f"{message}; the VM stays on the source")


def postcopy_failure_message(error: str | None) -> str:
    """``Failed`` text of a job that broke after the switch to post-copy."""
    return (
        "the migration failed after switching to post-copy: the guest's memory is split "
        "between the source and the target, so the guest is lost; it is not restarted "
        f"on either node (delete this VMMigration to let the source node recover the VM). "
        f"libvirt: {error or 'unknown error'}"
    )


def is_postcopy_failure(failure_reason: str | None) -> bool:
    """Whether a stored ``failureReason`` says the guest was lost in post-copy."""
    return str(failure_reason or "").startswith(f"{EndReason.POSTCOPY_FAILED}:")


def handoff_printable(mode: MigrationMode) -> str:
    """What the VM reads right after the hand-over: a live one runs; an offline one is
    stopped until the target's VM loop starts it (per ``runStrategy``)."""
    return "Running" if mode is MigrationMode.LIVE else "Stopped"


# --- while the job runs ------------------------------------------------------------------


def completion_budget(
    per_gib: int | None, memory_bytes: int, copied_disk_bytes: int
) -> float | None:
    """Seconds the job may take: ``completionTimeoutPerGiB * (RAM + copied disks) GiB``."""
    if per_gib is None:
        return None
    return per_gib * (memory_bytes + copied_disk_bytes) / GIB


def timed_out(budget: float | None, elapsed: float) -> bool:
    return budget is not None and elapsed > budget


def poll_interval(budget: float | None) -> float:
    """A short budget is checked more often than once a second (never below 0.1 s)."""
    return POLL_SECONDS if budget is None else max(0.1, min(POLL_SECONDS, budget / 2))


def should_abort(state: JobState, budget: float | None, elapsed: float) -> bool:
    """Abort for the completion timeout: asked each poll until libvirt accepts it once."""
    return not state.aborted and timed_out(budget, elapsed)


@dataclass(frozen=True)
class PollDecision:
    """What one ``jobStats()`` sample asks for."""

    start_post_copy: bool = False
    #: The progress to write to ``status.progress`` (None: not worth a write).
    publish: MigrationProgress | None = None


def decide_poll(
    state: JobState,
    sample: JobProgress,
    *,
    post_copy_allowed: bool,
    last_published: MigrationProgress | None,
    seconds_since_published: float,
) -> PollDecision:
    """Post-copy when pre-copy stalls (if allowed, not yet, and not aborting); progress
    when it changed and the last write is old enough. Records the sample in ``state``."""
    if not sample.active:
        return PollDecision()
    switch = False
    if post_copy_allowed and not state.post_copied and not state.aborted:
        state.samples.append((sample.memory_iteration, sample.memory_remaining))
        switch = postcopy_due(state.samples)
    progress = progress_of(sample)
    publish = should_publish(last_published, progress, seconds_since_published)
    return PollDecision(start_post_copy=switch, publish=progress if publish else None)


def progress_of(job: JobProgress) -> MigrationProgress:
    """``status.progress`` from one ``jobStats()`` sample."""
    percent = job.percent
    return MigrationProgress(
        percent=None if percent is None else int(percent),
        data_total_bytes=job.data_total,
        data_processed_bytes=job.data_processed,
        data_remaining_bytes=job.data_remaining,
        dirty_rate_bytes_per_second=job.dirty_rate_bytes_per_second,
        iteration=job.memory_iteration,
    )


def should_publish(
    last: MigrationProgress | None,
    new: MigrationProgress,
    seconds_since_last: float,
    interval: float = PROGRESS_INTERVAL_SECONDS,
) -> bool:
    """Publish when something changed and the previous write is at least ``interval`` old."""
    if last == new:
        return False
    return last is None or seconds_since_last >= interval


def postcopy_due(
    samples: Sequence[tuple[int, int]], *, after_iteration: int = POSTCOPY_AFTER_ITERATION
) -> bool:
    """Switch to post-copy now? ``samples`` are ``(iteration, memory remaining bytes)``
    from ``jobStats()`` in time order.

    The bytes left at the *start* of an iteration are what the guest dirtied during the
    previous one: pre-copy converges while that shrinks. It stalls when the current
    iteration is past ``after_iteration`` and its start is not smaller than the previous
    iteration's start. Iteration 0 (storage copy, before memory moves) never counts.
    """
    starts: dict[int, int] = {}
    for iteration, remaining in samples:
        if iteration > 0 and iteration not in starts:
            starts[iteration] = remaining
    if not starts:
        return False
    current = max(starts)
    if current <= after_iteration:
        return False
    earlier = [i for i in starts if i < current]
    if not earlier:
        return False
    return starts[current] >= starts[max(earlier)]
