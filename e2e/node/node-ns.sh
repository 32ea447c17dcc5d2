#!/usr/bin/env bash
# The first process of a local node (up.sh starts it under `unshare --net --mount
# --propagation private`): it makes the node's mount namespace what its daemons expect,
# then holds both namespaces for them (exec, as "tidepool-node-ns:<node>") until
# node-down ends it.
#
#   node-ns.sh NODE READY_FILE [--bind HOST_PATH=NODE_DIR_PATH]... [--sysctl PROC_PATH=FILE]...
#
# --bind: the node's own directory over a host path. /var/lib/kubelet is then made rshared,
#   so that mounts made in containers with Bidirectional propagation (the CSI plugin's)
#   reach kubelet and the other containers, and theirs reach it.
# --sysctl: a file bound over /proc/sys/<path> in this namespace only (see lib.sh,
#   KUBELET_SYSCTLS).
# Nothing here propagates to the host: the namespace was made private before.
set -euo pipefail
node=$1 ready=$2
shift 2
while [ $# -gt 0 ]; do
  case $1 in
    --bind)
      mount --bind "${2#*=}" "${2%%=*}"
      shift 2 ;;
    --sysctl)
      mount --bind "${2#*=}" "/proc/sys/${2%%=*}"
      shift 2 ;;
    *)
      echo "node-ns.sh: unknown argument $1" >&2
      exit 2 ;;
  esac
done
mount --make-rshared /var/lib/kubelet
ip link set lo up
: >"$ready"
exec -a "tidepool-node-ns:$node" sleep infinity
