"""Run the benchmark scenarios against the real local system and write the report.

``bench/run`` (or ``make bench``) brings up the harness with the operators, or reuses a
running one (``e2e/up --operators``, same ``VIRTFLEET_E2E_STATE``), runs every scenario
module of ``bench/scenarios/`` in a fixed order, each isolated (a failing scenario is
reported and the others still run), and writes ``bench/results/<date>.json``, the
Markdown table ``<date>.md`` and PNG plots beside them. ``--small`` is the smoke variant
(small N, results in a temporary directory unless ``--out`` says otherwise).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import pkgutil
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report, scenarios
from bench.result import BenchContext, ScenarioResult

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"

#: The order of a run: cheap control-plane scenarios first, the real-guest storms later.
ORDER = (
    "start_latency_testdriver",
    "scale_testdriver",
    "resync_testdriver",
    "start_latency_guests",
    "drift_healing",
    "migration_snapshot",
)


def discover() -> list[str]:
    """Scenario module names: ORDER first, then any other module, alphabetically."""
    found = {m.name for m in pkgutil.iter_modules(scenarios.__path__) if not m.name.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def host_facts() -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores and how busy the machine was."""
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "load1": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def run_one(name: str, ctx: BenchContext) -> dict[str, Any]:
    """Import and run one scenario; any failure becomes an ``error`` entry, never a crash."""
    started = time.monotonic()
    try:
        module = importlib.import_module(f"bench.scenarios.{name}")
        result = module.run(ctx)
        if not isinstance(result, ScenarioResult):
            raise TypeError(f"{name}.run returned {type(result).__name__}, not ScenarioResult")
        data = result.to_json()
    except Exception as err:
        log = ctx.out_dir / f"{name}.error.txt"
        log.write_text(traceback.format_exc())
        print(f"bench: {name} FAILED: {err!r} (traceback in {log})", file=sys.stderr)
        data = {"name": name, "title": name, "rows": [], "notes": [], "error": repr(err)[:500]}
    data["seconds"] = round(time.monotonic() - started, 1)
    return data


def ensure_system(state_dir: Path) -> tuple[dict[str, str], bool]:
    """The running system's env (started with operators if needed) and whether we started it."""
    from harness import cluster, operators

    if cluster.is_up(state_dir):
        env = cluster.read_env(state_dir)
        operators.start(state_dir, env)  # keeps running ones
        started = False
    else:
        env = cluster.up(state_dir, with_operators=True)
        started = True
    wait_for_hosts(env)
    return env, started


def wait_for_hosts(env: dict[str, str], timeout: float = 90.0) -> None:
    """Every node's agent has written its VMHost (the agents are up and connected)."""
    from harness import cluster, nodes

    want = {n.name for n in nodes.nodes_from_env(env)}
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.kubectl(env, "get", "vmhost", "-o", "name", check=False).stdout
        if want <= {line.rsplit("/", 1)[-1] for line in out.split()}:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no VMHost from every agent after {timeout:.0f} s: {out!r}")
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="smoke variant: small N, fast")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="repeatable")
    parser.add_argument("--out", type=Path, help="output directory (default: bench/results)")
    parser.add_argument("--state-dir", type=Path, help="harness state (VIRTFLEET_E2E_STATE)")
    parser.add_argument("--keep", action="store_true", help="keep a system this run started")
    parser.add_argument("--list", action="store_true", help="print the scenario names and exit")
    args = parser.parse_args(argv)

    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {names}")
    selected = [n for n in names if not args.only or n in args.only]

    from harness import cluster

    state_dir = (args.state_dir or cluster.default_state_dir()).resolve()
    out_dir = args.out or (
        Path(tempfile.mkdtemp(prefix="virtfleet-bench-")) if args.small else RESULTS_DIR
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="virtfleet-bench-scratch-"))
    stem = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d") + ("-small" if args.small else "")
    json_path = out_dir / f"{stem}.json"

    env, started = ensure_system(state_dir)
    document: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "small": args.small,
        "host": host_facts(),
        "scenarios": [],
    }
    try:
        for name in selected:
            print(f"bench: running {name}{' (small)' if args.small else ''}", file=sys.stderr)
            ctx = BenchContext(state_dir=state_dir, env=env, out_dir=scratch, small=args.small)
            document["scenarios"].append(run_one(name, ctx))
            json_path.write_text(json.dumps(document, indent=2) + "\n")  # partial results survive
    finally:
        # Scenarios' files (downloaded disks: gigabytes) go, whatever happened.
        shutil.rmtree(scratch, ignore_errors=True)
        if started and not args.keep:
            cluster.down(state_dir)
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path, pngs = report.write_report(json_path)
    print(md_path.read_text())
    print(f"bench: wrote {json_path}, {md_path}, {len(pngs)} plot(s)", file=sys.stderr)
    failed = [s["name"] for s in document["scenarios"] if s.get("error")]
    if failed:
        print(f"bench: failed scenarios: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
