#!/usr/bin/env bash
# The images the local node needs beside the product's (make images): no registry is
# reachable here, so each is built locally and saved as a docker-archive tarball in
# target/node-images/, which up.sh imports into each node's containerd.
#
#   pause.tar      localhost/tidepool-node/pause:1   the pod sandbox: e2e/node/pause.c, static
#   registrar.tar  localhost/tidepool-node/csi-node-driver-registrar:<its version>
#   liveness.tar   localhost/tidepool-node/livenessprobe:<its version, or sha256-<12 hex> of
#                  the binary where it records none (livenessprobe has no --version)>
#                  the chart's two CSI sidecars, from $TIDEPOOL_NODE_BIN's binaries (static
#                  Go programs; the image holds the binary alone, as upstream's distroless
#                  images hold little more)
#   azurite.tar    mcr.microsoft.com/azure-storage/azurite:3.35.0, under the name the e2e
#                  lake manifest uses: NOT Microsoft's image, but Debian bookworm (the base
#                  make images caches) + Debian's nodejs + the npm package azurite 3.35.0 as
#                  `make deps` installs it (node_modules/, pinned by package-lock.json);
#                  azurite-blob and node on PATH, as the manifest and its seed Job use them
#
# Each tarball is rebuilt only when its inputs change (a key beside it). buildah keeps its
# store in target/node-images/buildah (vfs: nothing stays mounted). Needs root.
#
# Usage: images.sh (prints the tarballs); sourced settings in lib.sh.
set -euo pipefail
NODE_PROG=node-images
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$(id -u)" = 0 ] || die "needs root (buildah's store is root's)"
command -v buildah >/dev/null || die "buildah is missing: apt-get install buildah (make images installs it too)"
command -v gcc >/dev/null || die "gcc is missing: apt-get install gcc libc6-dev (the pause program is C, linked static)"

mkdir -p "$NODE_IMAGES"
exec 8>"$NODE_IMAGES/.lock"
flock 8

BUILDAH=(buildah --root "$NODE_IMAGES/buildah/root" --runroot "$NODE_IMAGES/buildah/run" --storage-driver vfs)

# The version a CSI sidecar binary reports: --version where it has one (registrar), else
# the main module's version Go records in the binary (livenessprobe has no flag).
sidecar_version() {
  local bin=$1 v
  v=$("$bin" --version 2>/dev/null | grep -o 'v[0-9][0-9.]*[0-9]' | head -n1) || true
  if [ -z "$v" ]; then
    # `go version -m` without Go: the build info is plain text in the binary.
    v=$(grep -a -o 'mod[[:space:]]github.com/kubernetes-csi/[a-z-]*[[:space:]]v[0-9][0-9.]*[0-9]' "$bin" | head -n1 | awk '{print $3}') || true
  fi
  # livenessprobe has no version flag and a build from a source tree records "(devel)":
  # then the tag names the binary's content instead of guessing a version.
  [ -n "$v" ] || v=sha256-$(sha256sum <"$bin" | cut -c1-12)
  echo "$v"
}

# fresh TAR KEY: true when TAR exists and was built from inputs hashing to KEY.
fresh() { [ -s "$1" ] && [ "$(cat "$1.key" 2>/dev/null)" = "$2" ]; }

# save CTR IMAGE TAR KEY: commits a working container and writes the tarball.
save() {
  local ctr=$1 image=$2 tar=$3 key=$4
  "${BUILDAH[@]}" commit -q --rm --format docker "$ctr" "$image" >/dev/null
  rm -f "$tar.tmp"
  "${BUILDAH[@]}" push -q "$image" "docker-archive:$tar.tmp:$image"
  mv -f "$tar.tmp" "$tar"
  echo "$key" >"$tar.key"
  # The tarball is what counts; the store keeps the image only as long as the next build.
  "${BUILDAH[@]}" rmi "$image" >/dev/null 2>&1 || true
  say "built $image -> $tar ($(du -m "$tar" | cut -f1) MB)"
}

label() {
  printf '%s\n' --label "org.opencontainers.image.description=$1" \
    --label "dev.tidepool.node.built-by=e2e/node/images.sh (make node-up); local test image, not a published one"
}

# --- pause -------------------------------------------------------------------------------------
build_pause() {
  local tar=$NODE_IMAGES/pause.tar key work ctr
  key=$(cat "$NODE_SCRIPTS/pause.c" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
  fresh "$tar" "$key" && return
  work=$(mktemp -d)
  gcc -static -Os -s -Wall -Wextra -Werror -o "$work/pause" "$NODE_SCRIPTS/pause.c"
  "$work/pause" --version >/dev/null
  ctr=$("${BUILDAH[@]}" from --pull=never scratch)
  "${BUILDAH[@]}" copy -q "$ctr" "$work/pause" /pause >/dev/null
  # 65535: the pause process needs no privilege (as upstream's pause image runs).
  mapfile -t labels < <(label "pod sandbox process of the local test node (e2e/node/pause.c)")
  "${BUILDAH[@]}" config --os linux --arch "$(dpkg --print-architecture)" --entrypoint '["/pause"]' \
    --user 65535:65535 "${labels[@]}" "$ctr"
  save "$ctr" "$PAUSE_IMAGE" "$tar" "$key"
  rm -rf "$work"
}

# --- CSI sidecars ------------------------------------------------------------------------------
# build_sidecar VAR FILE BINARY REPO: sets <VAR>_VERSION (the tag); writes <FILE>.tar.
build_sidecar() {
  local var=$1 bin=$NODE_BIN/$3 repo=$4 version tar key ctr
  set -- "$2" "$3"
  version=$(sidecar_version "$bin")
  printf -v "${var}_VERSION" '%s' "$version"
  tar=$NODE_IMAGES/$1.tar
  key=$({ sha256sum <"$bin"; echo "$repo:$version"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)
  fresh "$tar" "$key" && return
  ctr=$("${BUILDAH[@]}" from --pull=never scratch)
  "${BUILDAH[@]}" copy -q --chmod 0755 "$ctr" "$bin" "/$2" >/dev/null
  mapfile -t labels < <(label "kubernetes-csi $2 $version, binary from TIDEPOOL_NODE_BIN")
  "${BUILDAH[@]}" config --os linux --arch "$(dpkg --print-architecture)" --entrypoint "[\"/$2\"]" \
    --label "org.opencontainers.image.version=$version" "${labels[@]}" "$ctr"
  save "$ctr" "$repo:$version" "$tar" "$key"
}

# --- Azurite -----------------------------------------------------------------------------------
# The Debian base make images made (e2e/images/build.sh caches it as a rootfs tarball).
base_tar() {
  local t
  t=$(ls -t "$PRODUCT_IMAGES"/cache/debian-bookworm-slim-*.tar 2>/dev/null | head -n1) || true
  [ -n "$t" ] && [ -s "$t" ] ||
    die "no Debian base in $PRODUCT_IMAGES/cache/: the Azurite image is built on the one make images makes without Docker; run make images (IMAGE_BUILDER=buildah where Docker runs)"
  echo "$t"
}

build_azurite() {
  local tar=$NODE_IMAGES/azurite.tar base key ctr mnt have
  have=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$NODE_REPO/node_modules/azurite/package.json" 2>/dev/null | head -n1) || true
  [ "$have" = "$AZURITE_VERSION" ] ||
    die "node_modules/azurite is ${have:-missing}, not $AZURITE_VERSION: run make deps (npm ci installs the pinned one)"
  base=$(base_tar)
  key=$({ echo "$base $AZURITE_VERSION"; cat "$NODE_REPO/package-lock.json" "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)
  fresh "$tar" "$key" && return
  say "building $AZURITE_IMAGE (Debian $(basename "$base") + nodejs + azurite $AZURITE_VERSION)"
  ctr=$("${BUILDAH[@]}" from --pull=never scratch)
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  tar -xpf "$base" -C "$mnt" --numeric-owner
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" config --env PATH=/opt/azurite/node_modules/.bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  "${BUILDAH[@]}" run --isolation chroot "$ctr" -- sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs >/dev/null && rm -rf /var/lib/apt/lists/*'
  # node_modules as npm ci left it (pure JavaScript: azurite and its dependencies).
  "${BUILDAH[@]}" copy -q "$ctr" "$NODE_REPO/node_modules" /opt/azurite/node_modules >/dev/null
  "${BUILDAH[@]}" run --isolation chroot "$ctr" -- sh -c 'node --version && azurite-blob --version' |
    sed 's/^/  in the image: /'
  mapfile -t labels < <(label "Azurite $AZURITE_VERSION (npm) on Debian bookworm's nodejs, for the e2e lake; not Microsoft's image")
  "${BUILDAH[@]}" config --os linux --arch "$(dpkg --print-architecture)" --workingdir /opt/azurite \
    --entrypoint '[]' --cmd '["azurite-blob", "--blobHost", "0.0.0.0", "--location", "/data"]' \
    --port 10000 --label "org.opencontainers.image.version=$AZURITE_VERSION" "${labels[@]}" "$ctr"
  save "$ctr" "$AZURITE_IMAGE" "$tar" "$key"
}

build_pause
build_sidecar REGISTRAR registrar csi-node-driver-registrar "$REGISTRAR_REPO"
build_sidecar LIVENESS liveness livenessprobe "$LIVENESS_REPO"
build_azurite
# For up.sh (it reads this file): the sidecars' tags.
printf 'REGISTRAR_VERSION=%s\nLIVENESS_VERSION=%s\n' "$REGISTRAR_VERSION" "$LIVENESS_VERSION" >"$NODE_IMAGES/versions"
say "images in $NODE_IMAGES: pause.tar registrar.tar ($REGISTRAR_VERSION) liveness.tar ($LIVENESS_VERSION) azurite.tar"
