"""Turn a benchmark run's JSON into what a reader looks at: a Markdown table and PNG plots.

Pure functions over the JSON document the runner writes (``bench/run.py``), so a report
can be rebuilt from an old results file (``python -m bench.report bench/results/X.json``)
and the formatting is unit-tested without a cluster. Plots need matplotlib (the ``bench``
extra); it is imported only when plotting.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Document = dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and the fraction of samples at or below each (the empirical CDF)."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def format_number(value: float | None) -> str:
    """Three significant digits: 0.0123, 1.23, 12.3, 1234."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 3:
        return f"{value:.0f}"
    return f"{value:.{max(0, 2 - magnitude)}f}"


def _with_unit(value: float | None, unit: str) -> str:
    return f"{format_number(value)} {unit}".strip() if value is not None else "-"


def _verdict(ok: bool | None) -> str:
    return {True: "✓", False: "✗", None: ""}[ok]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot_name(run: str, scenario: str, kind: str) -> str:
    """File name of a scenario's plot in run ``run`` (the JSON's stem); ``kind``: cdf|timeline."""
    return f"{slug(run)}-{slug(scenario)}-{kind}.png"


def scenario_table(scenario: Document) -> str:
    """The Markdown table of one scenario's rows (metric, virtfleet, raw, ratio, target, ✓/✗)."""
    lines = [
        "| metric | virtfleet | raw libvirt | ratio | target | met |",
        "|---|---:|---:|---:|---|:-:|",
    ]
    for row in scenario.get("rows", []):
        unit = row.get("unit", "")
        ratio = row.get("ratio")
        lines.append(
            "| {metric} | {vf} | {raw} | {ratio} | {target} | {ok} |".format(
                metric=_cell(row["metric"]),
                vf=_with_unit(row.get("virtfleet"), unit),
                raw=_with_unit(row.get("raw"), unit),
                ratio=f"{ratio:.2f}×" if ratio is not None else "-",
                target=_cell(row.get("target", "")),
                ok=_verdict(row.get("ok")),
            )
        )
    return "\n".join(lines)


def markdown(document: Document, plots: Mapping[str, Sequence[str]] | None = None) -> str:
    """The whole report: a heading per scenario, its table, notes, errors and plot links."""
    mode = "smoke (small N)" if document.get("small") else "full"
    out = [f"# virtfleet benchmarks — {document.get('date', '?')} ({mode})", ""]
    host = document.get("host") or {}
    if host:
        out += ["Host: " + ", ".join(f"{k} {v}" for k, v in sorted(host.items())), ""]
    for scenario in document.get("scenarios", []):
        out += [f"## {scenario.get('title') or scenario['name']}", ""]
        if scenario.get("error"):
            out += [f"**Failed:** `{_cell(scenario['error'])}`", ""]
        if scenario.get("rows"):
            out += [scenario_table(scenario), ""]
        out += [f"- {_cell(note)}" for note in scenario.get("notes", [])]
        if scenario.get("notes"):
            out.append("")
        if scenario.get("seconds") is not None:
            out += [f"_Scenario wall time: {scenario['seconds']:.0f} s._", ""]
        for name in (plots or {}).get(scenario["name"], ()):
            out += [f"![{name}]({name})", ""]
    return "\n".join(out).rstrip() + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(scenario: Document, path: Path) -> bool:
    """One CDF plot with a line per label of ``samples``; False when there is nothing to plot."""
    samples = {k: v for k, v in (scenario.get("samples") or {}).items() if v}
    if not samples:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in sorted(samples.items()):
        xs, ys = cdf_points(values)
        ax.step([xs[0], *xs], [0.0, *ys], where="post", label=f"{label} (n={len(values)})")
    ax.set_xlabel(scenario.get("sample_unit", "s"))
    ax.set_ylabel("fraction ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(textwrap.fill(scenario.get("title") or scenario["name"], 70), fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_timeline(scenario: Document, path: Path) -> bool:
    """One line plot with a line per label of ``timelines``; False when there is none."""
    timelines = {k: v for k, v in (scenario.get("timelines") or {}).items() if v}
    if not timelines:
        return False
    plt = _pyplot()
    x_label, y_label = scenario.get("timeline_axes") or ("seconds", "value")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(timelines.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.set_title(textwrap.fill(scenario.get("title") or scenario["name"], 70), fontsize=10)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(document: Document, out_dir: Path, run: str) -> dict[str, list[str]]:
    """Every plot of the run into ``out_dir``; returns scenario name → file names written."""
    written: dict[str, list[str]] = {}
    for scenario in document.get("scenarios", []):
        for kind, plot in (("cdf", plot_cdf), ("timeline", plot_timeline)):
            name = plot_name(run, scenario["name"], kind)
            if plot(scenario, out_dir / name):
                written.setdefault(scenario["name"], []).append(name)
    return written


def write_report(json_path: Path) -> tuple[Path, list[Path]]:
    """Markdown next to the JSON (same stem) and the plots beside it; returns their paths."""
    document = json.loads(json_path.read_text())
    plots = write_plots(document, json_path.parent, json_path.stem)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(document, plots))
    return md_path, [json_path.parent / name for names in plots.values() for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild a benchmark report from its JSON.")
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    md_path, pngs = write_report(args.json)
    print(md_path)
    for png in pngs:
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
