#!/usr/bin/env bash
# Checks the two tarballs `make images` leaves in target/images/ the way a cluster takes
# them: imports them into containerd (`ctr -n k8s.io images import`, as kind and k3s do)
# and runs them with `ctr run`. Called by `make images-test`, which sets NODE_IMAGE,
# OPERATOR_IMAGE and IMAGE_TAG.
#
# The containerd is a private one (Debian package containerd; runc), started for this check
# with its own root, state and socket under a temporary directory and stopped afterwards:
# nothing stays running, nothing is left in /var/lib/containerd. Its CRI plugin is off (ctr
# talks to containerd directly; no pod sandbox, so no oom_score_adj write either). Needs root.
#
# Checked: each archive holds exactly its image under the chart's name; the image config
# (entrypoint, user, labels) is the Dockerfile's; node: `tidepool --version` prints the
# workspace version, the entrypoint runs `tidepool`, it runs as root, fusermount3 is there
# (setuid root, runs) and so are the CA roots; operator: its config user is 65532:65532,
# `tidepool-operator --version` runs as that user, CA roots, no fusermount3.
set -euo pipefail

say() { printf 'images-test: %s\n' "$*"; }
die() { printf 'images-test: error: %s\n' "$*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

[ -n "${NODE_IMAGE:-}" ] && [ -n "${OPERATOR_IMAGE:-}" ] && [ -n "${IMAGE_TAG:-}" ] ||
  die "NODE_IMAGE, OPERATOR_IMAGE and IMAGE_TAG are not set: run this as make images-test"
NODE_TAR=target/images/tidepool.tar
OPERATOR_TAR=target/images/tidepool-operator.tar
# What the binaries' --version prints: the workspace version.
VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
[ -n "$VERSION" ] || die "cannot read the workspace version from Cargo.toml ([workspace.package] version)"

[ "$(id -u)" = 0 ] || die "needs root: it starts a private containerd and runs the images with runc (sudo make images-test)"
for tar in "$NODE_TAR" "$OPERATOR_TAR"; do
  [ -s "$tar" ] || die "$tar is missing: run make images first"
done
missing=()
command -v containerd >/dev/null || missing+=(containerd)
command -v ctr >/dev/null || missing+=(containerd) # ctr ships in Debian's containerd package
command -v containerd-shim-runc-v2 >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} != 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  command -v apt-get >/dev/null ||
    die "missing ${pkgs}and there is no apt-get here to install them: install these Debian packages"
  say "installing ${pkgs}(apt)"
  # shellcheck disable=SC2086 # package names, one word each
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; } ||
    die "apt-get could not install ${pkgs}(Debian packages); install them and run make images-test again"
fi

failures=0
passed=0
pass() { passed=$((passed + 1)); say "ok   $*"; }
fail() { failures=$((failures + 1)); printf 'images-test: FAIL %s\n' "$*" >&2; }

# --- 1. the archives, as files ----------------------------------------------------------------

# check_archive TAR IMAGE ENTRYPOINT USER TITLE: prints one line per problem, nothing if fine.
check_archive() {
  python3 - "$@" "$IMAGE_TAG" <<'EOF'
import json, sys, tarfile
tar, image, entrypoint, user, title, tag = sys.argv[1:]
problems = []
with tarfile.open(tar) as t:
    manifest = json.load(t.extractfile("manifest.json"))
    if len(manifest) != 1:
        problems.append(f"holds {len(manifest)} images, not 1")
    m = manifest[0]
    if m.get("RepoTags") != [image]:
        problems.append(f"is tagged {m.get('RepoTags')}, not [{image!r}]")
    c = json.load(t.extractfile(m["Config"]))
cfg = c.get("config") or {}
want = {
    "os": ("linux", c.get("os")),
    "architecture": ("amd64", c.get("architecture")),
    "Entrypoint": ([entrypoint], cfg.get("Entrypoint")),
    "Cmd": ([], cfg.get("Cmd") or []),
    "User": (user, cfg.get("User")),
}
labels = cfg.get("Labels") or {}
for k, v in {
    "org.opencontainers.image.title": title,
    "org.opencontainers.image.version": tag,
    "org.opencontainers.image.source": "https://github.com/tidepool-dev/tidepool",
    "org.opencontainers.image.licenses": "Apache-2.0",
}.items():
    want[f"label {k}"] = (v, labels.get(k))
if not labels.get("org.opencontainers.image.description"):
    problems.append("has no org.opencontainers.image.description label")
for k, (w, got) in want.items():
    if w != got:
        problems.append(f"config {k} is {got!r}, not {w!r}")
if not any(e.startswith("PATH=") for e in cfg.get("Env") or []):
    problems.append("config sets no PATH")
for p in problems:
    print(p)
EOF
}

for spec in "$NODE_TAR|$NODE_IMAGE|tidepool|0:0|tidepool" \
  "$OPERATOR_TAR|$OPERATOR_IMAGE|tidepool-operator|65532:65532|tidepool-operator"; do
  IFS='|' read -r tar image entrypoint user title <<<"$spec"
  problems=$(check_archive "$tar" "$image" "$entrypoint" "$user" "$title" 2>&1) || problems="cannot read it as a docker-archive: $problems"
  if [ -z "$problems" ]; then
    pass "$tar: one image, $image; entrypoint [$entrypoint], user $user, labels title $title and version $IMAGE_TAG"
  else
    while IFS= read -r p; do fail "$tar: $p"; done <<<"$problems"
  fi
done

# --- 2. a private containerd ------------------------------------------------------------------

tmp=$(mktemp -d /tmp/tidepool-images-test.XXXXXX)
sock=$tmp/containerd.sock
cgroup=tidepool-images-test-$$ # the containers' cgroup parent, removed at the end
containerd_pid=

cleanup() {
  local rc=$? pid left
  set +e
  if [ -n "$containerd_pid" ]; then
    kill "$containerd_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$containerd_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$containerd_pid" 2>/dev/null
    wait "$containerd_pid" 2>/dev/null
  fi
  # Shims of this containerd (their command line names its socket) that outlived it.
  for f in /proc/[0-9]*/cmdline; do
    case $({ tr '\0' ' ' <"$f"; } 2>/dev/null) in
      *containerd-shim*"$sock"*) pid=${f#/proc/}; kill -9 "${pid%/cmdline}" 2>/dev/null ;;
    esac
  done
  findmnt -rn -o TARGET | grep -F "$tmp/" | sort -r | xargs -r -n1 umount -l
  for d in /sys/fs/cgroup/"$cgroup" /sys/fs/cgroup/*/"$cgroup"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  left=$(findmnt -rn -o TARGET | grep -F "$tmp/")
  if [ -z "$left" ]; then rm -rf "$tmp"; else say "left $tmp: still mounted: $left"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$tmp/config.toml" <<EOF
version = 2
root = "$tmp/root"
state = "$tmp/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$tmp/opt"
EOF
containerd --config "$tmp/config.toml" >"$tmp/containerd.log" 2>&1 &
containerd_pid=$!
CTR=(ctr --address "$sock" --namespace k8s.io)
for _ in $(seq 100); do
  "${CTR[@]}" version >/dev/null 2>&1 && break
  kill -0 "$containerd_pid" 2>/dev/null || { tail -n 20 "$tmp/containerd.log" >&2; die "containerd exited at start (its log is above)"; }
  sleep 0.2
done
"${CTR[@]}" version >/dev/null 2>&1 || { tail -n 20 "$tmp/containerd.log" >&2; die "containerd did not answer on $sock within 20 s (its log is above)"; }
# overlayfs as kind and k3s use it; native where the kernel or /tmp's file system refuses it.
snapshotter=overlayfs
[ "$("${CTR[@]}" plugins ls 2>/dev/null | awk '$1 == "io.containerd.snapshotter.v1" && $2 == "overlayfs" {print $NF}')" = ok ] || snapshotter=native
say "private containerd $(containerd --version | awk '{print $3}') on $sock (snapshotter $snapshotter, cgroup parent /$cgroup)"

# --- 3. import ---------------------------------------------------------------------------------

for spec in "$NODE_TAR|$NODE_IMAGE" "$OPERATOR_TAR|$OPERATOR_IMAGE"; do
  IFS='|' read -r tar image <<<"$spec"
  if out=$("${CTR[@]}" images import --snapshotter "$snapshotter" "$tar" 2>&1) &&
    "${CTR[@]}" images ls -q | grep -xF "$image" >/dev/null; then
    pass "ctr -n k8s.io images import $tar: $image"
  else
    fail "ctr -n k8s.io images import $tar did not give $image: $out"
    die "$failures check(s) failed; the images are not in containerd under the names the chart uses, so nothing was run"
  fi
done

# --- 4. run ------------------------------------------------------------------------------------

# run IMAGE NAME [COMMAND...]: sets OUT (stdout and stderr) and RC. ctr run without a command
# runs the image's entrypoint; with one, the command replaces entrypoint and cmd.
n=0
run() {
  local image=$1 name=$2; shift 2
  n=$((n + 1))
  RC=0
  OUT=$(timeout 120 "${CTR[@]}" run --rm --snapshotter "$snapshotter" --cgroup "/$cgroup/$name-$n" "$image" "$name-$n" "$@" 2>&1) || RC=$?
}

# expect WHAT PATTERN IMAGE NAME [COMMAND...]: the output matches the (grep -E) PATTERN and,
# unless WHAT starts with "any-exit:", the exit code is 0.
expect() {
  local what=$1 pattern=$2 any=
  shift 2
  case $what in any-exit:*) any=1 what=${what#any-exit:} ;; esac
  run "$@"
  if { [ -n "$any" ] || [ "$RC" = 0 ]; } && grep -qE -- "$pattern" <<<"$OUT"; then
    pass "$what: $(head -n1 <<<"$OUT")"
  else
    fail "$what: exit $RC, output does not match /$pattern/: ${OUT:-<none>}"
  fi
}

N=$NODE_IMAGE
O=$OPERATOR_IMAGE
expect "node: tidepool --version" "^tidepool $VERSION\$" "$N" node-version tidepool --version
expect "any-exit:node: the entrypoint runs tidepool (no arguments: its usage)" "[Uu]sage" "$N" node-entrypoint
expect "node: runs as root" "^uid=0\(root\) gid=0\(root\)" "$N" node-id id
expect "node: fusermount3 is setuid root" "^-rwsr-xr-x root /usr/bin/fusermount3\$" "$N" node-fusermount-mode stat -c '%A %U %n' /usr/bin/fusermount3
expect "node: fusermount3 -V" "^fusermount3 version: 3\." "$N" node-fusermount fusermount3 -V
expect "node: CA roots" "^ok\$" "$N" node-ca sh -c 'test -s /etc/ssl/certs/ca-certificates.crt && echo ok'
expect "operator: runs as 65532:65532" "^uid=65532 gid=65532" "$O" operator-id id
expect "operator: tidepool-operator --version as 65532" "^tidepool-operator $VERSION\$" "$O" operator-version tidepool-operator --version
expect "operator: CA roots" "^ok\$" "$O" operator-ca sh -c 'test -s /etc/ssl/certs/ca-certificates.crt && echo ok'
expect "operator: no fusermount3 (no fuse3)" "^absent\$" "$O" operator-nofuse sh -c 'command -v fusermount3 || echo absent'

if [ "$failures" != 0 ]; then
  die "$failures check(s) failed, $passed passed"
fi
say "all $passed checks passed"
