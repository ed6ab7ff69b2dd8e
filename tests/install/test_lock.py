"""requirements/lock.txt and runtime.txt (`make lock`) are what scripts/bootstrap and the
image install: they must pin, with hashes, everything pyproject.toml asks for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
#: What the lock is for: Debian bookworm's Python on x86-64.
ENVIRONMENT = {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux"}


def pins(path: Path) -> dict[str, Version]:
    """Name → version of every pin; fails on a pin without a hash."""
    text = path.read_text()
    found: dict[str, Version] = {}
    for entry in re.split(r"\n(?=\S)", text):
        if match := PINNED.match(entry):
            assert "--hash=sha256:" in entry, f"{path.name}: {match[1]} has no hash"
            found[canonicalize_name(match[1])] = Version(match[2])
    assert found, path
    return found


def requirements(pyproject: Path, *extras: str) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    wanted = [Requirement(line) for line in lines]
    return [
        r
        for r in wanted
        if r.name != "virtfleet" and (r.marker is None or r.marker.evaluate(ENVIRONMENT))
    ]


def unmet(wanted: list[Requirement], pinned: dict[str, Version]) -> list[str]:
    return [
        str(r)
        for r in wanted
        if canonicalize_name(r.name) not in pinned
        or not r.specifier.contains(pinned[canonicalize_name(r.name)], prereleases=True)
    ]


def test_the_lock_pins_everything_bootstrap_installs() -> None:
    pinned = pins(REPO / "requirements" / "lock.txt")
    wanted = requirements(REPO / "pyproject.toml", "test", "dev", "bench")
    wanted += requirements(REPO / "testkit" / "pyproject.toml")
    wanted += requirements(REPO / "e2e" / "pyproject.toml")
    assert unmet(wanted, pinned) == [], "requirements/lock.txt is out of date: run make lock"


def test_the_image_lock_is_the_runtime_part_of_the_same_versions() -> None:
    lock = pins(REPO / "requirements" / "lock.txt")
    runtime = pins(REPO / "requirements" / "runtime.txt")
    assert unmet(requirements(REPO / "pyproject.toml"), runtime) == []
    assert {name: lock.get(name) for name in runtime} == runtime
    assert "pytest" not in runtime


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("scripts/bootstrap", "--require-hashes -r requirements/lock.txt"),
        ("scripts/bootstrap", "--no-deps -e . -e ./testkit -e ./e2e"),
        ("Dockerfile", "--require-hashes \\\n        -r requirements/runtime.txt"),
        ("Dockerfile", "--no-deps /src"),
        (".dockerignore", "!requirements/runtime.txt"),
    ],
)
def test_bootstrap_and_the_image_install_from_the_locks(path: str, needle: str) -> None:
    assert needle in (REPO / path).read_text()
