# Tidepool's container images, built by `make images` as two targets of this one file:
#
#   docker build --target operator -t ghcr.io/tidepool-dev/tidepool-operator:<appVersion> .
#   docker build --target node     -t ghcr.io/tidepool-dev/tidepool:<appVersion> .
#
# The repositories are the ones charts/tidepool/values.yaml names (operator.image and
# node.image) and the tag is the chart's appVersion, the chart's default tag.
#
# Two images, not one, because the two processes need different things from their image:
# - the operator talks only to the API server, runs as a non-root user (65532, as the
#   chart's pod securityContext says) and needs nothing but its binary and CA roots;
# - the node image runs `tidepool csi`, `tidepool agent` and `tidepool sync` as root (the
#   plugin calls mount(2) on /dev/fuse and bind-mounts into kubelet's directory; the agent
#   and sidecar own the root-owned pool) and carries fuse3: `fusermount3` is how Tidepool
#   mounts and unmounts FUSE when mount(2) refuses it (EPERM: no CAP_SYS_ADMIN, e.g.
#   `tidepool mount` run from this image without privileges), and what a person debugging
#   a node reaches for.
# One image for both would ship a setuid fusermount3 and a root-oriented image to the
# operator, which never mounts anything. Both binaries come out of one builder stage, so
# the dependency graph is compiled once.
#
# Base images are pinned by tag: the Rust image at the workspace's rust-version (the MSRV
# in Cargo.toml), Debian at a dated bookworm-slim snapshot tag (never rebuilt, unlike
# `bookworm-slim`). To pin by digest as well, pass the full reference, e.g.
#   docker build --build-arg RUST_IMAGE=rust:1.89.0-bookworm@sha256:<digest> \
#                --build-arg DEBIAN_IMAGE=debian:bookworm-20251229-slim@sha256:<digest> ...
# (or `make images DOCKER_BUILD_ARGS="--build-arg ..."`). The apt packages below come from
# the bookworm archive at build time. The builder and the runtime share Debian 12, so the
# binaries run against the glibc they were linked with.
#
# Needs BuildKit (Docker >= 23 uses it by default) for the cache mounts.

ARG RUST_IMAGE=rust:1.89.0-bookworm
ARG DEBIAN_IMAGE=debian:bookworm-20251229-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Only what the two binaries are built from. The CSI protobuf is compiled by a pure-Rust
# compiler (protox) at build time: no protoc. ring's C and assembly need the image's cc.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY crds crds
COPY operator operator
COPY csi-driver csi-driver
# The registry and target directories are BuildKit caches (kept between builds, not in
# the image), so the binaries are copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tidepool --bin tidepool-operator \
 && install -D -m 0755 target/release/tidepool /out/tidepool \
 && install -D -m 0755 target/release/tidepool-operator /out/tidepool-operator

# The controller: no lake credentials, no mounts, no root.
FROM ${DEBIAN_IMAGE} AS operator
ARG VERSION=dev
LABEL org.opencontainers.image.title="tidepool-operator" \
      org.opencontainers.image.description="Tidepool controller: DatasetCache and CheckpointSync into PVs, PVCs and CachePool assignments" \
      org.opencontainers.image.source="https://github.com/tidepool-dev/tidepool" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/tidepool-operator /usr/local/bin/tidepool-operator
# 65532: the chart's runAsUser/runAsGroup for the operator (the "nonroot" uid of
# distroless images); numeric, so runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
ENTRYPOINT ["tidepool-operator"]

# The node side: `tidepool csi`, `tidepool agent`, `tidepool sync` (one binary).
FROM ${DEBIAN_IMAGE} AS node
ARG VERSION=dev
LABEL org.opencontainers.image.title="tidepool" \
      org.opencontainers.image.description="Tidepool node side: CSI plugin, node agent (cache pool, FUSE) and checkpoint sync" \
      org.opencontainers.image.source="https://github.com/tidepool-dev/tidepool" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# ca-certificates: the lake is reached over HTTPS (Azure Blob, private endpoints).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/tidepool /usr/local/bin/tidepool
# Root: the plugin mounts (privileged container) and the agent and the sync sidecar own
# the pool's root-owned files; the chart drops every capability each container does not
# need (values.yaml, node.agent and node.sync).
USER 0:0
ENTRYPOINT ["tidepool"]
