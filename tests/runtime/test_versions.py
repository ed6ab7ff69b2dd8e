"""No cache rolls back to an older copy of an object (runtime.versions)."""

from __future__ import annotations

from typing import Any

from virtfleet.runtime.versions import is_older, store_newest


def body(version: str, value: str = "") -> dict[str, Any]:
    return {"metadata": {"name": "a", "resourceVersion": version}, "status": {"v": value}}


def test_an_older_copy_is_not_stored_and_a_newer_or_equal_one_is() -> None:
    cache: dict[str, dict[str, Any]] = {"a": body("7", "theirs")}
    assert not store_newest(cache, "a", body("6", "ours"))
    assert cache["a"]["status"]["v"] == "theirs"
    assert store_newest(cache, "a", body("7", "same"))
    assert store_newest(cache, "a", body("12", "later"))
    assert cache["a"]["status"]["v"] == "later"


def test_a_response_does_not_bring_back_what_the_cache_dropped() -> None:
    cache: dict[str, dict[str, Any]] = {}
    assert not store_newest(cache, "a", body("3"), cached_only=True)
    assert cache == {}
    assert store_newest(cache, "a", body("3"))


def test_versions_that_are_not_numbers_never_count_as_older() -> None:
    assert not is_older(body("abc"), body("9"))
    assert not is_older(body("9"), body("abc"))
    assert not is_older(body("9"), None)
    assert is_older(body("9"), body("10"))  # numerically, not as text
