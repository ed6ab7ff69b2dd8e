"""The Dockerfile's essentials (hadolint, run by `make lint`, checks the rest)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.*)$", DOCKERFILE, re.MULTILINE)


def test_base_image_is_pinned() -> None:
    (base,) = re.findall(r"^ARG BASE=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert re.fullmatch(r"[\w./-]+(:[\w.-]*\d{8}[\w.-]*|@sha256:[0-9a-f]{64})", base), base
    assert all(line.split()[0] == "${BASE}" for line in instructions("FROM"))


def test_multi_stage_and_non_root() -> None:
    assert len(instructions("FROM")) == 2
    users = instructions("USER")
    assert users
    assert not users[-1].startswith(("0", "root"))


def test_no_remote_add_and_no_dev_packages_at_runtime() -> None:
    assert not instructions("ADD")
    runtime = DOCKERFILE.split("\nFROM ${BASE}\n", 1)[1]
    assert "libvirt0" in runtime
    assert "libvirt-dev" not in runtime
    assert "gcc" not in runtime


def test_build_context_is_small() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[1:2] == ["*"] or "*" in ignore
    assert "!operator/" in ignore
