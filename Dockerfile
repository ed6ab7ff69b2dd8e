# syntax=docker/dockerfile:1
# One image for both processes: `virtfleet agent` (DaemonSet) and `virtfleet controller`
# (Deployment); the chart picks the mode with the first argument.
#
# Base: Debian bookworm, the platform virtfleet is developed and tested on, pinned to a
# dated tag (bump it deliberately; pin by digest in your registry mirror if you rebuild).
# Debian's python3 (3.11) and libvirt0 (9.0) are what the tests run against.
ARG BASE=debian:bookworm-20251229-slim

# --- build: compile libvirt-python against libvirt-dev, install virtfleet into a venv ---
FROM ${BASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc pkg-config libvirt-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The locked versions CI tested (requirements/runtime.txt, hash-checked; `make lock`),
# then virtfleet itself without dependencies.
COPY requirements/runtime.txt requirements/
RUN python3 -m venv /opt/virtfleet \
    && /opt/virtfleet/bin/pip install --no-cache-dir --no-compile --require-hashes \
        -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN /opt/virtfleet/bin/pip install --no-cache-dir --no-compile --no-deps /src \
    && /opt/virtfleet/bin/pip check \
    && /opt/virtfleet/bin/virtfleet --version

# --- runtime: python3 + libvirt client library + the venv; no compiler, no libvirt-dev ---
FROM ${BASE}
LABEL org.opencontainers.image.title="virtfleet" \
      org.opencontainers.image.description="Declarative, GitOps-native reconciler for libvirt/QEMU VMs" \
      org.opencontainers.image.licenses="Apache-2.0"
# nftables: the agent's guest firewall (an nft table that keeps user NICs off the node).
# qemu-utils: qemu-img joins a backup chain into one disk when a VM is restored from a backup.
# dnsmasq-base: the DHCP server of each VMNetwork on the node (unshare is util-linux's).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libvirt0 ca-certificates nftables qemu-utils \
        dnsmasq-base \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/virtfleet /opt/virtfleet
ENV PATH=/opt/virtfleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default: the controller runs as is (Pod Security "restricted"). The agent
# pod sets runAsUser: 0 because libvirtd's read-write socket (/var/run/libvirt/libvirt-sock)
# accepts root only; libvirtd itself does the privileged work. The user has a passwd
# entry: kopf names its process by getpass.getuser(), which fails (and the controller with
# it) for a uid the image does not know.
RUN groupadd --gid 65532 virtfleet \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin virtfleet
USER 65532:65532
# No HEALTHCHECK: Kubernetes probes (the agent's --liveness endpoint) do that job.
ENTRYPOINT ["virtfleet"]
CMD ["--help"]
