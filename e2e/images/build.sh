#!/usr/bin/env bash
# Builds Tidepool's two container images, as the Dockerfile describes them, and leaves them
# as docker-archive tarballs (what `docker save` writes; what `kind load image-archive`,
# `ctr -n k8s.io images import` and k3s's agent/images directory take):
#
#   target/images/tidepool.tar           NODE_IMAGE     (Dockerfile target node)
#   target/images/tidepool-operator.tar  OPERATOR_IMAGE (Dockerfile target operator)
#
# Called by `make images`, which sets NODE_IMAGE, OPERATOR_IMAGE, IMAGE_TAG, DOCKER and CARGO.
# Two ways, chosen by IMAGE_BUILDER (auto, docker or buildah; auto = docker where
# `docker info` succeeds, buildah otherwise):
#
# docker:  docker build of both Dockerfile targets (DOCKER_BUILD_ARGS is passed on), then
#          docker save into the tarballs. The images also stay in the Docker daemon.
#
# buildah: no Docker daemon and no registry needed; only Debian's archive (and crates.io
#          for cargo). Needs root and a Debian/Ubuntu host (apt); the binaries are built on
#          the host, so the host's glibc must not be newer than bookworm's 2.36 (Debian 12
#          hosts are fine).
#   1. `cargo build --release --locked` of tidepool and tidepool-operator on the host.
#   2. The Debian bookworm base (the Dockerfile's DEBIAN_IMAGE): made with debuerreotype,
#      the tool that makes Docker's official debian:*-slim images (debootstrap --variant=
#      minbase, its minimizing config, apt-get full-upgrade from bookworm, bookworm-updates
#      and bookworm-security, slimify), from the Debian mirror this host's apt uses
#      (DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR override it). The result is cached as a
#      rootfs tarball in target/images/cache/, keyed by the recipe below, the suite, the
#      mirrors and debuerreotype's version; IMAGES_REFRESH_BASE=1 rebuilds it (newer
#      security updates), and so does deleting target/images/cache/.
#   3. `buildah build` of the Dockerfile's operator and node targets, with DEBIAN_IMAGE set
#      to that base and the Dockerfile's `build` stage replaced by the host's binaries
#      (--build-context build=target/images/context, whose out/ holds them): the Dockerfile
#      stays the one description of both images (labels, packages, user, entrypoint).
#      Isolation chroot (RUN apt-get ... in the host's network); storage in target/images/
#      buildah/<driver>/, overlay where the kernel allows it, else vfs (BUILDAH_STORAGE_DRIVER
#      picks one); --layers keeps the apt-get layers between runs.
#   4. `buildah push ... docker-archive:` writes the tarballs.
set -euo pipefail

say() { printf 'images: %s\n' "$*"; }
die() { printf 'images: error: %s\n' "$*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

[ -n "${NODE_IMAGE:-}" ] && [ -n "${OPERATOR_IMAGE:-}" ] && [ -n "${IMAGE_TAG:-}" ] ||
  die "NODE_IMAGE, OPERATOR_IMAGE and IMAGE_TAG are not set: run this as make images"
DOCKER=${DOCKER:-docker}
CARGO=${CARGO:-cargo}
OUT=target/images
NODE_TAR=$OUT/tidepool.tar
OPERATOR_TAR=$OUT/tidepool-operator.tar
SUITE=bookworm # the Dockerfile's DEBIAN_IMAGE (debian:bookworm-*-slim)
BOOKWORM_GLIBC=2.36

# --- Docker ---------------------------------------------------------------------------------

build_docker() {
  local extra=()
  # DOCKER_BUILD_ARGS is shell words, as on the docker command line (quotes allowed).
  eval "extra=(${DOCKER_BUILD_ARGS:-})"
  DOCKER_BUILDKIT=1 "$DOCKER" build --target operator --build-arg VERSION="$IMAGE_TAG" "${extra[@]}" -t "$OPERATOR_IMAGE" .
  DOCKER_BUILDKIT=1 "$DOCKER" build --target node --build-arg VERSION="$IMAGE_TAG" "${extra[@]}" -t "$NODE_IMAGE" .
  local pair image tar
  for pair in "$OPERATOR_IMAGE=$OPERATOR_TAR" "$NODE_IMAGE=$NODE_TAR"; do
    image=${pair%%=*} tar=${pair#*=}
    say "docker save $image -> $tar"
    rm -f "$tar.tmp"
    { "$DOCKER" save -o "$tar.tmp" "$image" && mv -f "$tar.tmp" "$tar"; } || die "docker save of $image to $tar failed (see above)"
  done
}

# --- buildah: host tools --------------------------------------------------------------------

need_root() {
  [ "$(id -u)" = 0 ] || die "building the images without Docker needs root (debootstrap and chroot make the Debian base, buildah stores the images as root): run it as root (sudo make images), or where a Docker daemon answers."
}

# The Debian packages this path uses, installed with apt like `make deps` does.
need_packages() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v debuerreotype-init >/dev/null || missing+=(debuerreotype)
  command -v buildah >/dev/null || missing+=(buildah)
  command -v wget >/dev/null || missing+=(wget) # debuerreotype-init reads the mirror's Release date with it
  [ -s /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
  if [ ${#missing[@]} != 0 ]; then
    command -v apt-get >/dev/null ||
      die "missing ${missing[*]} and there is no apt-get here to install them: install the Debian packages ${missing[*]} (or build where Docker runs)."
    say "installing ${missing[*]} (apt)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
      die "apt-get could not install ${missing[*]}; they are Debian packages (bookworm: main); install them and run make images again."
  fi
  buildah build --help 2>/dev/null | grep -- '--build-context' >/dev/null ||
    die "buildah $(buildah --version | awk '{print $3}') is too old: --build-context (buildah >= 1.27, Debian 12 has 1.28) is how the host's binaries replace the Dockerfile's build stage."
}

# The binaries are built here and run on bookworm's glibc.
check_glibc() {
  local host
  host=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}') ||
    die "cannot tell this host's C library (getconf GNU_LIBC_VERSION failed); the host-built binaries need glibc <= $BOOKWORM_GLIBC (Debian 12) to run in the bookworm images."
  [ "$(printf '%s\n%s\n' "$host" "$BOOKWORM_GLIBC" | sort -V | tail -n1)" = "$BOOKWORM_GLIBC" ] ||
    die "this host's glibc is $host, newer than bookworm's $BOOKWORM_GLIBC: binaries built here would not run in the images. Build on Debian 12, or where Docker runs (the Dockerfile builds them in rust:*-bookworm)."
}

# The mirror this host's apt uses for a suite (apt-get indextargets), else deb.debian.org.
host_mirror() {
  local uri
  # shellcheck disable=SC2016 # $(...) are apt's format fields, not the shell's
  uri=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' 2>/dev/null |
    awk -v s="$1" '$1 == s { print $2; exit }') || true
  uri=${uri:-$2}
  printf '%s\n' "${uri%/}"
}

# --- buildah: the Debian base ---------------------------------------------------------------

# The image's APT sources, as the official image has them (deb822, main, three suites).
write_sources() {
  cat >"$1" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

# debuerreotype's recipe for debian:<suite>-slim (its examples/debian.sh), from $DEBIAN_MIRROR
# instead of snapshot.debian.org. Writes the rootfs tarball $2 (no /dev, /proc, /sys, APT
# lists or caches). This function's text is part of the cache key.
base_recipe() {
  local root=$1 tar=$2 include=()
  # apt needs CA roots for an https mirror (the default http mirror needs none).
  case "$DEBIAN_MIRROR $DEBIAN_SECURITY_MIRROR" in *https:*) include=(--include ca-certificates) ;; esac
  debuerreotype-init --non-debian --keyring /usr/share/keyrings/debian-archive-keyring.gpg \
    "${include[@]}" "$root" "$SUITE" "$DEBIAN_MIRROR"
  debuerreotype-minimizing-config "$root"
  rm -f "$root/etc/apt/sources.list"
  write_sources "$root/etc/apt/sources.list.d/debian.sources"
  debuerreotype-apt-get "$root" update -qq
  debuerreotype-apt-get "$root" full-upgrade -yqq
  debuerreotype-slimify "$root"
  debuerreotype-recalculate-epoch "$root"
  debuerreotype-tar --exclude ./etc/machine-id "$root" "$tar"
}

# Sets BASE_TAR and BASE_EPOCH: the cached rootfs tarball, built if missing.
ensure_base_tar() {
  local key dir=$OUT/cache
  key=$({
    declare -f base_recipe write_sources
    echo "$SUITE $(dpkg --print-architecture) $DEBIAN_MIRROR $DEBIAN_SECURITY_MIRROR"
    cat /usr/share/debuerreotype/VERSION 2>/dev/null || debuerreotype-version 2>/dev/null || true
  } | sha256sum | cut -c1-16)
  BASE_TAR=$dir/debian-$SUITE-slim-$key.tar
  if [ "${IMAGES_REFRESH_BASE:-0}" = 1 ]; then rm -f "$BASE_TAR" "$BASE_TAR.epoch"; fi
  if [ ! -s "$BASE_TAR" ] || [ ! -s "$BASE_TAR.epoch" ]; then
    say "making the Debian $SUITE base (debuerreotype: debootstrap minbase + full-upgrade + slim) from $DEBIAN_MIRROR and $DEBIAN_SECURITY_MIRROR, a few minutes; log $dir/base.log"
    mkdir -p "$dir"
    # debuerreotype-chroot mounts /dev, /proc, /sys in a private mount namespace, so a
    # stale rootfs of an interrupted run holds no mounts.
    rm -rf "$dir/rootfs.tmp" "$BASE_TAR.tmp"
    base_recipe "$dir/rootfs.tmp" "$BASE_TAR.tmp" >"$dir/base.log" 2>&1 || {
      tail -n 30 "$dir/base.log" >&2
      die "making the Debian base failed (the end of $dir/base.log is above); the mirrors are $DEBIAN_MIRROR and $DEBIAN_SECURITY_MIRROR (DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR set others)."
    }
    cp "$dir/rootfs.tmp/debuerreotype-epoch" "$BASE_TAR.epoch"
    rm -rf "$dir/rootfs.tmp"
    mv -f "$BASE_TAR.tmp" "$BASE_TAR"
    # Older keys' tarballs are of no further use.
    find "$dir" -maxdepth 1 -name "debian-$SUITE-slim-*.tar*" ! -name "$(basename "$BASE_TAR")*" -delete
  fi
  BASE_EPOCH=$(cat "$BASE_TAR.epoch")
  say "Debian $SUITE base: $BASE_TAR (archive state of $(date -u -d "@$BASE_EPOCH" +%F); IMAGES_REFRESH_BASE=1 makes a new one)"
}

# --- buildah: the images --------------------------------------------------------------------

pick_storage() {
  local driver=${BUILDAH_STORAGE_DRIVER:-}
  if [ -z "$driver" ]; then
    # overlay stores each layer once; where the kernel or the file system under target/
    # refuses it (e.g. target/ on overlayfs), vfs (a full copy per layer) always works.
    if buildah --root "$OUT/buildah/overlay/root" --runroot "$OUT/buildah/overlay/run" \
      --storage-driver overlay images -q >/dev/null 2>"$OUT/buildah-overlay-probe.log"; then
      driver=overlay
    else
      say "buildah's overlay storage does not work here ($(head -n1 "$OUT/buildah-overlay-probe.log")); using vfs"
      driver=vfs
    fi
    rm -f "$OUT/buildah-overlay-probe.log"
  fi
  BUILDAH=(buildah --root "$OUT/buildah/$driver/root" --runroot "$OUT/buildah/$driver/run" --storage-driver "$driver")
  say "buildah storage: $OUT/buildah/$driver ($driver driver), isolation chroot"
  # Working containers an interrupted run left behind (the store is this script's alone).
  "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
}

# Sets BASE_IMAGE: the base tarball as a one-layer image in the buildah store.
ensure_base_image() {
  BASE_IMAGE=localhost/tidepool-build/debian:$SUITE-slim-$(basename "$BASE_TAR" .tar | sed 's/.*-//')
  "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 && return
  say "importing the base into buildah as $BASE_IMAGE"
  local ctr mnt
  ctr=$("${BUILDAH[@]}" from --pull=never scratch)
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  tar -xpf "$BASE_TAR" -C "$mnt" --numeric-owner ||
    die "cannot unpack $BASE_TAR into buildah's container (delete it to make a new one)"
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" config --os linux --arch "$(dpkg --print-architecture)" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --created-by "debuerreotype $SUITE slim from $DEBIAN_MIRROR (archive state $(date -u -d "@$BASE_EPOCH" +%FT%TZ))" "$ctr"
  "${BUILDAH[@]}" commit -q --identity-label=false --timestamp "$BASE_EPOCH" --rm "$ctr" "$BASE_IMAGE" >/dev/null
}

# buildah build of one Dockerfile target, pushed to a docker-archive tarball.
build_target() {
  local target=$1 image=$2 tar=$3
  say "buildah build --target $target -> $image"
  "${BUILDAH[@]}" build --isolation chroot --layers --pull=never --format docker --identity-label=false \
    --build-context build="$OUT/context" \
    --build-arg DEBIAN_IMAGE="$BASE_IMAGE" --build-arg VERSION="$IMAGE_TAG" \
    --target "$target" -t "$image" -f Dockerfile . ||
    die "buildah build --target $target failed (see above)"
  say "buildah push $image -> $tar"
  rm -f "$tar.tmp"
  { "${BUILDAH[@]}" push -q "$image" "docker-archive:$tar.tmp:$image" && mv -f "$tar.tmp" "$tar"; } ||
    die "buildah push of $image to $tar failed (see above)"
}

build_buildah() {
  need_packages
  check_glibc
  DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(host_mirror "$SUITE" http://deb.debian.org/debian)}
  DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(host_mirror "$SUITE-security" http://deb.debian.org/debian-security)}
  [ -z "${DOCKER_BUILD_ARGS:-}" ] ||
    say "note: DOCKER_BUILD_ARGS ($DOCKER_BUILD_ARGS) is for docker build; without Docker the base is made locally and it is not used"

  say "cargo build --release of tidepool and tidepool-operator"
  "$CARGO" build --release --locked -p tidepool-csi --bin tidepool -p tidepool-operator --bin tidepool-operator ||
    die "cargo build --release failed (see above)"
  local bin release=${CARGO_TARGET_DIR:-target}/release
  # The build context that stands in for the Dockerfile's build stage (its /out).
  rm -rf "$OUT/context"
  mkdir -p "$OUT/context/out"
  for bin in tidepool tidepool-operator; do
    [ -x "$release/$bin" ] || die "cargo built no $release/$bin"
    ln "$release/$bin" "$OUT/context/out/$bin" 2>/dev/null || install -m 0755 "$release/$bin" "$OUT/context/out/$bin"
  done

  ensure_base_tar
  pick_storage
  ensure_base_image
  build_target operator "$OPERATOR_IMAGE" "$OPERATOR_TAR"
  build_target node "$NODE_IMAGE" "$NODE_TAR"

  prune_store
}

# The store exists only to make these tarballs: keep the two images, the base and the
# intermediate images they are built on (the --layers cache), drop the rest. Images of
# earlier builds lost their names to these; an unnamed image is dangling once it has no
# children, so pruning repeatedly removes stale chains down to the layers still shared.
prune_store() {
  local _
  remove_other_names
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ -n "$("${BUILDAH[@]}" images -q --filter dangling=true)" ] || break
    "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || break
  done
  remove_other_names # an older base has no children left now
}

remove_other_names() {
  "${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}' | grep -v '^<none>' |
    grep -vxF -e "$NODE_IMAGE" -e "$OPERATOR_IMAGE" -e "$BASE_IMAGE" |
    xargs -r -n1 "${BUILDAH[@]}" rmi >/dev/null 2>&1 || true
}

# --- main -----------------------------------------------------------------------------------

builder=${IMAGE_BUILDER:-auto}
case $builder in
  auto)
    if command -v "$DOCKER" >/dev/null && "$DOCKER" info >/dev/null 2>&1; then
      builder=docker
    else
      builder=buildah
      say "no Docker daemon answers here ($DOCKER info fails or $DOCKER is not installed): building with buildah from a locally made Debian base (IMAGE_BUILDER=docker|buildah chooses)"
    fi ;;
  docker)
    command -v "$DOCKER" >/dev/null || die "IMAGE_BUILDER=docker but $DOCKER is not installed"
    "$DOCKER" info >/dev/null 2>&1 || die "IMAGE_BUILDER=docker but Docker's daemon does not answer ($DOCKER info fails)" ;;
  buildah) ;;
  *) die "IMAGE_BUILDER is '$builder': auto, docker or buildah" ;;
esac

[ "$builder" = docker ] || need_root
mkdir -p "$OUT"
# One build at a time: they share the buildah store, the base cache and the tarballs.
exec 9>"$OUT/.lock"
flock -n 9 || { say "waiting for another make images (lock $OUT/.lock)"; flock 9; }

"build_$builder"

say "built with $builder:"
for pair in "$OPERATOR_IMAGE=$OPERATOR_TAR" "$NODE_IMAGE=$NODE_TAR"; do
  say "  ${pair#*=}  $(du -m "${pair#*=}" | cut -f1) MB  ${pair%%=*}"
done
say "load them with: kind load image-archive <tar> --name <cluster> | ctr -n k8s.io images import <tar> | copy into /var/lib/rancher/k3s/agent/images/ (k3s); make images-test checks them"
