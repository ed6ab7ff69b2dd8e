"""bench/report.py: numbers, the Markdown table and the plots, from JSON alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.result import Row, ScenarioResult

from bench import report


def scenario(**overrides: object) -> dict[str, object]:
    data = ScenarioResult(
        name="start_latency_guests",
        title="Start latency",
        rows=[
            Row("p50", 1.5, "s", raw=1.0, target="≤ 1.15× raw", ok=False),
            Row("writes | per VM", 3.0, "writes/VM", target="≤ 4", ok=True),
            Row("max", None, "s"),
        ],
        samples={"virtfleet": [0.3, 0.1, 0.2], "raw": [0.05, 0.1], "empty": []},
        timelines={"fresh statuses": [(0.0, 0.0), (1.0, 500.0), (2.0, 1000.0)]},
        notes=["64 MiB guests"],
    ).to_json()
    data.update(overrides)
    return data


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert report.percentile(values, 0) == 1.0
    assert report.percentile(values, 100) == 4.0
    assert report.percentile(values, 50) == pytest.approx(2.5)
    assert report.percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError, match="no values"):
        report.percentile([], 50)


def test_cdf_points_are_sorted_and_end_at_one() -> None:
    xs, ys = report.cdf_points([3.0, 1.0, 2.0, 2.0])
    assert xs == [1.0, 2.0, 2.0, 3.0]
    assert ys == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (0, "0"),
        (0.01234, "0.0123"),
        (1.234, "1.23"),
        (12.34, "12.3"),
        (1234.5, "1234"),
    ],
)
def test_format_number_keeps_three_significant_digits(value: float | None, text: str) -> None:
    assert report.format_number(value) == text


def test_table_has_ratio_verdict_and_escapes_pipes() -> None:
    table = report.scenario_table(scenario())
    lines = table.splitlines()
    assert lines[0].startswith("| metric | virtfleet | raw libvirt | ratio | target | met |")
    assert lines[2] == "| p50 | 1.50 s | 1.00 s | 1.50× | ≤ 1.15× raw | ✗ |"
    assert lines[3] == "| writes \\| per VM | 3.00 writes/VM | - | - | ≤ 4 | ✓ |"
    assert lines[4] == "| max | - | - | - |  |  |"


def test_markdown_shows_errors_notes_and_only_this_scenarios_plots() -> None:
    failed = {"name": "drift_healing", "title": "Drift", "rows": [], "error": "BenchError('x')"}
    document = {"date": "2026-11-27", "small": True, "scenarios": [scenario(), failed]}
    text = report.markdown(document, {"start_latency_guests": ["a-cdf.png"]})
    assert "(smoke (small N))" in text
    assert "## Start latency" in text
    assert "- 64 MiB guests" in text
    assert "**Failed:** `BenchError('x')`" in text
    assert text.count("![a-cdf.png](a-cdf.png)") == 1
    assert text.index("a-cdf.png") < text.index("## Drift")


def test_write_report_makes_markdown_and_pngs_beside_the_json(tmp_path: Path) -> None:
    document = {"date": "2026-11-27", "small": False, "scenarios": [scenario()]}
    path = tmp_path / "2026-11-27.json"
    path.write_text(json.dumps(document))
    md_path, pngs = report.write_report(path)
    assert md_path == tmp_path / "2026-11-27.md"
    assert sorted(p.name for p in pngs) == [
        "2026-11-27-start-latency-guests-cdf.png",
        "2026-11-27-start-latency-guests-timeline.png",
    ]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2026-11-27-start-latency-guests-cdf.png" in md_path.read_text()


def test_no_plot_without_data(tmp_path: Path) -> None:
    bare = scenario(samples={"virtfleet": []}, timelines={})
    assert report.write_plots({"scenarios": [bare]}, tmp_path, "run") == {}
    assert list(tmp_path.iterdir()) == []
