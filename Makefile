# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin

.PHONY: bootstrap demo down test unit e2e lint crds gitops chaos soak bench coverage lock image

bootstrap:
	@scripts/bootstrap

## Bring up a local control plane, two libvirt nodes, the operator and an example VM.
demo: bootstrap
	@e2e/up --operators --demo

## Stop everything `make demo` started.
down:
	@e2e/down

## Everything CI runs: lint, types, generated files, unit and end-to-end tests.
test: bootstrap lint
	$(VENV)/pytest --durations=30 tests e2e

unit: bootstrap
	$(VENV)/pytest tests

e2e: bootstrap
	$(VENV)/pytest e2e

## The long chaos run: VIRTFLEET_CHAOS_SECONDS (default 900) of SIGKILLs under a workload;
## VIRTFLEET_CHAOS_SEED=<printed seed> replays a schedule.
chaos: bootstrap
	VIRTFLEET_CHAOS_SECONDS=$${VIRTFLEET_CHAOS_SECONDS:-900} $(VENV)/pytest -m chaos -s e2e/test_chaos.py

## The full benchmark run against raw libvirt: bench/results/<date>.{json,md} + plots.
bench: bootstrap
	bench/run

## The long churn/soak run on a test-driver node: VIRTFLEET_CHURN_VMS (default 300) VMs
## created, halted and deleted for VIRTFLEET_CHURN_ROUNDS (default 20) rounds; prints the
## agent's RSS slope after warm-up and fails beyond VIRTFLEET_CHURN_RSS_NOISE_MIB (default 4)
## plus VIRTFLEET_CHURN_RSS_SLOPE_LIMIT (default 2) MiB per 1,000 operations.
soak: bootstrap
	VIRTFLEET_CHURN_VMS=$${VIRTFLEET_CHURN_VMS:-300} VIRTFLEET_CHURN_ROUNDS=$${VIRTFLEET_CHURN_ROUNDS:-20} $(VENV)/pytest -s e2e/test_churn.py

lint:
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/lint-imports
	$(VENV)/virtfleet crds --check
	$(VENV)/hadolint Dockerfile
	$(VENV)/python gitops/argocd/generate.py --check

## The container image from the Dockerfile, without a daemon or a registry (buildah; the
## base made from Debian packages by mmdebstrap): localhost/virtfleet:dev.
image:
	scripts/build-image

## Regenerate crds/ (and the chart's copy) from the API models.
crds:
	$(VENV)/virtfleet crds

## Regenerate the Argo CD settings (gitops/argocd/) from the chart's Lua health checks.
gitops:
	$(VENV)/python gitops/argocd/generate.py

## Re-resolve the locks from pyproject.toml: requirements/lock.txt (what scripts/bootstrap
## and so CI install: the dev and bench extras) and requirements/runtime.txt (what the image
## installs: the same versions, runtime dependencies only). Pinned versions stay unless
## UPGRADE=1 (or UPGRADE="--upgrade-package NAME") asks for newer ones.
LOCK := $(VENV)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu --custom-compile-command "make lock" \
	$(if $(filter 1,$(UPGRADE)),--upgrade,$(UPGRADE))
## Line coverage of operator/virtfleet by the unit tests alone (no libvirtd, no apiserver).
coverage: bootstrap
	$(VENV)/coverage run --source=operator/virtfleet -m pytest -q tests
	$(VENV)/coverage report --skip-covered --sort=cover

lock:
	@test -x $(VENV)/uv || scripts/bootstrap || test -x $(VENV)/uv
	$(LOCK) pyproject.toml --extra dev --extra bench -o requirements/lock.txt
	$(LOCK) pyproject.toml -c requirements/lock.txt -o requirements/runtime.txt
