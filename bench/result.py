"""The shape every benchmark scenario returns, so one runner can write JSON, Markdown and plots.

A scenario module lives in ``bench/scenarios/<name>.py`` and exposes
``run(ctx: BenchContext) -> ScenarioResult``. It measures virtfleet and, in the same run, raw
libvirt doing the same work, and reports each figure as a :class:`Row` (with the ratio to raw
where there is a raw counterpart). Distributions go into ``samples`` (plotted as CDFs) and
time series into ``timelines`` (plotted as lines), keyed by a label such as
``"virtfleet"`` / ``"raw libvirt"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BenchContext:
    """What a scenario gets from the runner: the running system and where to put files."""

    state_dir: Path  # the harness state dir (e2e/harness/cluster.py)
    env: dict[str, str]  # the harness environment (KUBECONFIG, node URIs, ...)
    out_dir: Path  # scratch/output directory of this run
    small: bool  # smoke variant: small N, seconds not minutes


@dataclass
class Row:
    """One line of the results table."""

    metric: str  # e.g. "creation → Running p50"
    virtfleet: float | None
    unit: str  # "s", "ms", "MiB", "writes/VM", "count"
    raw: float | None = None  # raw libvirt doing the same work, same run
    target: str = ""  # human-readable target, e.g. "≤ 0.25 s" or "≤ 1.15× raw"
    ok: bool | None = None  # target met? None when there is no target

    @property
    def ratio(self) -> float | None:
        if self.virtfleet is None or not self.raw:
            return None
        return self.virtfleet / self.raw


@dataclass
class ScenarioResult:
    name: str  # module name, e.g. "start_latency_testdriver"
    title: str  # heading in the report
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)  # label -> values (CDF plot)
    sample_unit: str = "s"
    timelines: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # label -> (t, y)
    timeline_axes: tuple[str, str] = ("seconds", "value")
    notes: list[str] = field(default_factory=list)  # free text shown under the table

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for row, raw_row in zip(self.rows, data["rows"], strict=True):
            raw_row["ratio"] = row.ratio
        return data
