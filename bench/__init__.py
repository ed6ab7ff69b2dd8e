"""Benchmarks against raw libvirt: `make bench` (full) and a smoke variant in `make test`."""
