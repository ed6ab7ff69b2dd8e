"""Test helpers shared by virtfleet's unit tests (tests/), end-to-end suite (e2e/) and
benchmarks (bench/): installed by scripts/bootstrap, never part of the image."""
