#!/usr/bin/env bash
# make node-down: stops and removes everything make node-up started or changed, then
# checks that nothing is left: no process, mount, network namespace, veth, route,
# address, iptables rule or cgroup of the local cluster, no directory it made on the host.
# The daemons' logs stay in target/node-logs/. Safe to run again (and when node-up failed
# half-way): it finds what is left by name as well as from target/node/.
#
# Order: each node's kubelet (so that nothing restarts the containers), the containers (every
# process in the node's cgroup), then the rest of the node's processes (containerd, its
# shims, kube-proxy) and the process holding its namespaces; the mounts and the network
# namespace go with the last process in them. Then the DNS and the control plane, then
# the host's routes, address, sysctl and directories.
set -euo pipefail
NODE_PROG=node-down
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NODE_T0=$SECONDS

[ "$(id -u)" = 0 ] || die "needs root (sudo make node-down)"

cgroup_mounts() {
  awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo | grep '^/sys/fs/cgroup'
}

ns_of() { readlink "/proc/$1/ns/$2" 2>/dev/null || true; }
cmdline() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null || true; }
all_pids() { ls /proc | grep -E '^[0-9]+$' | grep -vx "$$" || true; }

# The process holding node NAME's namespaces (node-ns.sh after its exec).
holder_of() {
  local p
  for p in $(all_pids); do
    case $(cmdline "$p") in "tidepool-node-ns:$1 "*) echo "$p"; return ;; esac
  done
}

# Every process of a node: in its cgroup subtree (containers), or in its network or mount
# namespace (containerd, shims, kubelet, kube-proxy, the holder).
node_pids() {
  local i=$1 holder=$2 m cg net= mnt= p
  cg=$(node_cgroup "$i")
  {
    for m in $(cgroup_mounts); do
      [ -d "$m$cg" ] && find "$m$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
    done
    # A holder that is gone has no namespaces to compare with (an empty name would match
    # every process whose namespaces cannot be read, such as one that just ended).
    if [ -n "$holder" ]; then
      net=$(ns_of "$holder" net)
      mnt=$(ns_of "$holder" mnt)
    fi
    if [ -n "$net" ] || [ -n "$mnt" ]; then
      local pn pm
      for p in $(all_pids); do
        pn=$(ns_of "$p" net)
        pm=$(ns_of "$p" mnt)
        if { [ -n "$net" ] && [ "$pn" = "$net" ]; } || { [ -n "$mnt" ] && [ "$pm" = "$mnt" ]; }; then echo "$p"; fi
      done
    fi
  } | sort -un | grep -vx "$$" || true
}

# signal SIG PID...: those still there.
signal() {
  local sig=$1 p
  shift
  for p in "$@"; do kill "-$sig" "$p" 2>/dev/null || true; done
}

# gone WITHIN PID...: waits until none of them runs.
gone() {
  local secs=$1 p i left
  shift
  for ((i = 0; i < secs * 4; i++)); do
    left=0
    for p in "$@"; do [ -d "/proc/$p" ] && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.25
  done
  return 1
}

exe_pids() { # pids of node i whose executable is $NODE_BIN/NAME
  local p
  for p in $2; do
    [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$NODE_BIN/$1" ] && echo "$p"
  done
  true
}

stop_node() {
  local i=$1 name holder pids k
  name=$(node_name "$i")
  holder=$(holder_of "$name")
  pids=$(node_pids "$i" "$holder")
  [ -n "$pids" ] || return 0
  say "$name: stopping $(echo "$pids" | wc -w) processes"
  # kubelet first: nothing restarts the containers after it.
  k=$(exe_pids kubelet "$pids")
  if [ -n "$k" ]; then
    # shellcheck disable=SC2086
    signal TERM $k
    # shellcheck disable=SC2086
    gone 15 $k || signal KILL $k
  fi
  # The containers: every process in the node's cgroups, until none is left.
  local n
  for n in $(seq 1 40); do
    pids=$(node_pids "$i" "")
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086
    signal KILL $pids
    sleep 0.25
  done
  # containerd, its shims, kube-proxy: politely, then not.
  pids=$(node_pids "$i" "$holder" | grep -vx "${holder:-none}" || true)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    signal TERM $pids
    # shellcheck disable=SC2086
    gone 15 $pids || signal KILL $pids
  fi
  if [ -n "$holder" ]; then
    signal KILL "$holder"
    gone 10 "$holder" || true
  fi
  pids=$(node_pids "$i" "$holder")
  [ -z "$pids" ] || { sleep 2; pids=$(node_pids "$i" "$holder"); }
  [ -z "$pids" ] || say "warning: $name: processes left: $(echo $pids)"
}

# Processes started with a path of the state directory in their arguments (the control
# plane, the DNS), or recorded in pids/.
stop_control_plane() {
  local name pids=() p
  for name in dns kube-scheduler kube-controller-manager kube-apiserver etcd; do
    p=$(daemon_pid "$name" 2>/dev/null) && pids+=("$p")
  done
  for p in $(all_pids); do
    case $(cmdline "$p") in *"$NODE_DIR/"*) pids+=("$p") ;; esac
  done
  [ ${#pids[@]} != 0 ] || return 0
  mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
  say "control plane: stopping ${#pids[@]} processes"
  signal TERM "${pids[@]}"
  gone 20 "${pids[@]}" || { signal KILL "${pids[@]}"; gone 10 "${pids[@]}" || true; }
}

remove_cgroups() {
  local i m cg
  for ((i = 1; i <= NODE_COUNT; i++)); do
    cg=$(node_cgroup "$i")
    for m in $(cgroup_mounts); do
      [ -d "$m$cg" ] || continue
      # Deepest first; a cgroup with no process left is removed with rmdir.
      find "$m$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
  done
}

undo_host_changes() {
  local f=$NODE_DIR/host-changes kind a b
  if [ -f "$f" ]; then
    # Newest first.
    while read -r kind a b; do
      case $kind in
        addr) ip addr del "$a" dev "$b" 2>/dev/null || true ;;
        route) ip route del $a $b 2>/dev/null || true ;;
        sysctl) sysctl -qw "$a=$b" ;;
        iptables) iptables -D $a $b 2>/dev/null || true ;;
        dir) if [ -d "$a" ] && ! mountpoint -q "$a"; then rmdir "$a" 2>/dev/null || say "warning: $a is not empty; left as it is"; fi ;;
        cgroup) ;; # remove_cgroups
      esac
    done < <(tac "$f")
  fi
  # By name too (a node-up that failed before recording, or state removed by hand).
  local i
  for ((i = 1; i <= NODE_COUNT; i++)); do
    ip link del "$(node_veth "$i")" 2>/dev/null || true
  done
  ip addr del "$CP_IP/32" dev lo 2>/dev/null || true
  for a in "$CLUSTER_CIDR" "$NODE_NET" "$SERVICE_CIDR"; do
    ip route del unreachable "$a" 2>/dev/null || true
  done
}

# --- the checks --------------------------------------------------------------------------------

leftovers() {
  local p i m out=()
  for p in $(all_pids); do
    case $(cmdline "$p") in
      *"$NODE_DIR/"* | "tidepool-node-ns:"*) out+=("process $p: $(cmdline "$p")") ;;
    esac
  done
  for ((i = 1; i <= NODE_COUNT; i++)); do
    for m in $(cgroup_mounts); do
      [ -d "$m$(node_cgroup "$i")" ] && out+=("cgroup $m$(node_cgroup "$i")")
    done
    ip link show "$(node_veth "$i")" >/dev/null 2>&1 && out+=("veth $(node_veth "$i")")
  done
  cp_ip_on_lo && out+=("address $CP_IP on lo")
  while read -r l; do out+=("route $l"); done < <(ip route show |
    grep -E "^(unreachable )?($CP_IP|${CLUSTER_CIDR%%.0.0/*}\.|${NODE_NET%%.0.0/*}\.|${SERVICE_CIDR%%.0.0/*}\.)" || true)
  # Mounts of the cluster in the host's mount namespace (there should never be any).
  while read -r m; do out+=("mount $m"); done < <(awk '{print $5}' /proc/self/mountinfo |
    grep -E "^($NODE_DIR|/var/lib/kubelet|/var/lib/tidepool|/var/lib/containerd|/var/lib/cni|/var/log/pods|/var/log/containers)(/|$)" || true)
  # iptables chains of kube-proxy, kubelet or CNI in the host's tables.
  while read -r c; do out+=("iptables chain $c"); done < <(iptables-save 2>/dev/null | grep -oE '^:(KUBE-|CNI-)[A-Za-z0-9_-]+' || true)
  # Network namespaces: ours have no name; any named one of CNI's would be a leftover.
  while read -r n; do out+=("netns $n"); done < <(ip netns list 2>/dev/null | grep -E '^cni-' || true)
  while read -r v; do out+=("veth $v"); done < <(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | grep -E '^tp-' || true)
  for m in "${NODE_BINDS[@]}"; do
    m=${m%% *}
    # A directory node-up made on the host and did not remove.
    grep -qxF "dir $m" "$NODE_DIR/host-changes" 2>/dev/null && [ -d "$m" ] && out+=("directory $m")
  done
  printf '%s\n' "${out[@]}"
}

# --- main ----------------------------------------------------------------------------------------

found=0
[ -d "$NODE_DIR" ] && found=1
for ((i = 1; i <= NODE_COUNT; i++)); do
  [ -n "$(holder_of "$(node_name "$i")")" ] && found=1
  ip link show "$(node_veth "$i")" >/dev/null 2>&1 && found=1
done
cp_ip_on_lo && found=1
if [ "$found" = 0 ] && [ -z "$(leftovers)" ]; then
  say "nothing is up (no $NODE_DIR, no leftovers found)"
  exit 0
fi

for ((i = 1; i <= NODE_COUNT; i++)); do stop_node "$i"; done
stop_control_plane
remove_cgroups
undo_host_changes

left=$(leftovers)
if [ -n "$left" ]; then
  echo "node-down: error: left behind (state kept in $NODE_DIR):" >&2
  echo "$left" | sed 's/^/  /' >&2
  exit 1
fi
# Nothing is mounted under it in this (the host's) namespace: checked above.
[ ! -d "$NODE_DIR" ] || rm -rf --one-file-system "$NODE_DIR"
say "down in $(elapsed): no process, mount, cgroup, veth, route, address or iptables rule of the local cluster is left; logs kept in $NODE_LOGS/"
