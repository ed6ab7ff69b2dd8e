"""Names that reach the file system are refused unless plainly safe."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtfleet.hypervisor.errors import InvalidName
from virtfleet.hypervisor.names import validate_name


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "/etc/passwd",
        ".hidden",
        "a/b",
        "..",
        ".",
        "",
        "x..y",
        "a\x00b",
        "a b",
        "x" * 256,
        "$(id)",
        "<x>",
        "-rf",
    ],
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize("name", ["debian-12.qcow2", "root", "seed_v1.raw", "a", "x" * 255, "vm+1"])
def test_plain_names_pass(name: str) -> None:
    assert validate_name(name) == name


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_accepted_names_cannot_escape_their_directory(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName:
        return
    assert "/" not in name
    assert not name.startswith(".")
    assert ".." not in name
    assert "\x00" not in name
    assert 0 < len(name) <= 255
