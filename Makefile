# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin

.PHONY: bootstrap demo down test unit e2e lint crds gitops

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
	$(VENV)/pytest tests e2e

unit: bootstrap
	$(VENV)/pytest tests

e2e: bootstrap
	$(VENV)/pytest e2e

lint:
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/virtfleet crds --check
	$(VENV)/hadolint Dockerfile
	$(VENV)/python gitops/argocd/generate.py --check

## Regenerate crds/ (and the chart's copy) from the API models.
crds:
	$(VENV)/virtfleet crds

## Regenerate the Argo CD settings (gitops/argocd/) from the chart's Lua health checks.
gitops:
	$(VENV)/python gitops/argocd/generate.py
