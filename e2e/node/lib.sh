# Shared by up.sh, down.sh and images.sh: where things are, which addresses the local
# cluster uses, and small helpers. Sourced, never run. Every path is absolute: nsenter
# starts commands in /, so a relative path would mean something else inside a node.
#
# The cluster (make node-up):
#
#   host network namespace                         node netns "tidepool-node-<i>" (i = 1, 2)
#   ----------------------                         -----------------------------------------
#   etcd            127.0.0.1:12379                containerd (own /var/lib/containerd, /run/containerd)
#   kube-apiserver  10.200.0.1:6443 (on lo)        kubelet    node IP 10.201.<i>.2, cgroupRoot /tidepool-node-<i>
#   controller-mgr, scheduler (10.200.0.1)         kube-proxy (iptables mode, this netns only)
#   cluster DNS     10.200.0.1:53 (dns.py)         pods       10.244.<i>.0/24 on bridge tp-br0
#   veth tp-node<i> 10.201.<i>.1 <-------------->  eth0 10.201.<i>.2
#   routes 10.244.<i>.0/24 via 10.201.<i>.2        routes to 10.200.0.1, 10.96/16, 10.201/16, 10.244/16
#                                                  via the host; no default route (nothing leaves)
#
# Each node also has its own mount namespace, private from the host's: bind mounts of its
# own directories over /var/lib/kubelet (made rshared, for Bidirectional propagation),
# /var/lib/tidepool, /var/lib/containerd, /run/containerd, /var/lib/cni, /var/log/pods and
# /var/log/containers, and /run/netns (where containerd names each pod's network namespace:
# on the host's /run/netns they would outlive the node as dead entries in `ip netns`).
# Nothing a node mounts (FUSE, bind mounts, tmpfs, network namespaces) reaches the host.

NODE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NODE_SCRIPTS=$NODE_REPO/e2e/node
# Runtime state of the running cluster; node-down removes it.
NODE_DIR=$NODE_REPO/target/node
# The daemons' logs; kept by node-down for diagnosis, moved aside by the next node-up.
NODE_LOGS=$NODE_REPO/target/node-logs
# The images node-up builds itself (pause, sidecars, Azurite) and buildah's store: a cache.
NODE_IMAGES=$NODE_REPO/target/node-images
# The product's images, from make images.
PRODUCT_IMAGES=$NODE_REPO/target/images

# The Kubernetes binaries, under their upstream names.
NODE_BIN_DEFAULT=/opt/tidepool-node-bin
NODE_BIN=${TIDEPOOL_NODE_BIN:-$NODE_BIN_DEFAULT}
NODE_BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl csi-node-driver-registrar livenessprobe)

# Addresses and names. 10.200.0.1 is put on the host's lo (a loopback address would not do:
# pods reach the API server and the DNS from other network namespaces).
CP_IP=10.200.0.1
APISERVER_PORT=6443
APISERVER_URL=https://$CP_IP:$APISERVER_PORT
ETCD_CLIENT_PORT=12379
ETCD_PEER_PORT=12380
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
CLUSTER_CIDR=10.244.0.0/16
NODE_NET=10.201.0.0/16
CLUSTER_DOMAIN=cluster.local
NODE_COUNT=2
# The node the e2e suite treats as the GPU node (e2e/src/env.rs: exactly one).
GPU_LABEL=tidepool.dev/gpu=true

node_name() { echo "tidepool-node-$1"; }
node_veth() { echo "tp-node$1"; }
# Whether the control plane's address is on lo. Not `ip ... | grep -q`: under pipefail, grep
# leaving at the first match can end ip with SIGPIPE, and the pipeline then fails although
# the address is there (seen about once in twenty).
cp_ip_on_lo() {
  local a
  a=$(ip -o addr show dev lo)
  [[ $a == *" $CP_IP/"* ]]
}
node_host_ip() { echo "10.201.$1.1"; }
node_ip() { echo "10.201.$1.2"; }
node_pod_cidr() { echo "10.244.$1.0/24"; }
node_pod_gw() { echo "10.244.$1.1"; }
node_cgroup() { echo "/tidepool-node-$1"; }
node_dir() { echo "$NODE_DIR/nodes/$(node_name "$1")"; }

# The directories each node binds over the host's path in its own mount namespace:
# "<host path> <name of its directory under the node's dir>".
NODE_BINDS=(
  "/var/lib/kubelet kubelet"
  "/var/lib/tidepool tidepool"
  "/var/lib/containerd containerd"
  "/run/containerd containerd-run"
  "/var/lib/cni cni"
  "/var/log/pods log-pods"
  "/var/log/containers log-containers"
  "/run/netns netns"
)

# kubelet sets these host-wide sysctls to its liking at start (vm.overcommit_memory=1,
# kernel.panic=10, kernel.panic_on_oops=1, ...). They are not namespaced: a test node must
# not change how this machine panics. Each node's mount namespace shows kubelet files with
# the values it wants over them; the host's values stay as they are.
KUBELET_SYSCTLS=(
  "vm/overcommit_memory 1"
  "vm/panic_on_oom 0"
  "kernel/panic 10"
  "kernel/panic_on_oops 1"
  "kernel/keys/root_maxkeys 1000000"
  "kernel/keys/root_maxbytes 25000000"
)

# Images node-up builds (images.sh). The sidecars are built from $NODE_BIN's binaries and
# named for what they are (their upstream versions), under localhost/ so that nobody takes
# them for the registry's.
PAUSE_IMAGE=localhost/tidepool-node/pause:1
REGISTRAR_REPO=localhost/tidepool-node/csi-node-driver-registrar
LIVENESS_REPO=localhost/tidepool-node/livenessprobe
# The e2e lake's image, under the name e2e/manifests/azurite.yaml uses (IfNotPresent).
AZURITE_VERSION=3.35.0
AZURITE_IMAGE=mcr.microsoft.com/azure-storage/azurite:$AZURITE_VERSION
# The e2e lake's endpoint (e2e/manifests/azurite.yaml), allowed for the node agents
# (chart value node.lake.allowedEndpoints): plain HTTP, in the cluster only.
E2E_LAKE_ENDPOINT=http://azurite.tidepool-e2e.svc.cluster.local:10000

HELM_VENV=$NODE_REPO/.tools/helm-venv
NODE_HELM=$NODE_SCRIPTS/helm
KUBECTL_BIN=$NODE_BIN/kubectl
KUBECONFIG_ADMIN=$NODE_DIR/kubeconfig

say() { printf '%s: %s\n' "${NODE_PROG:-node}" "$*"; }
die() {
  printf '%s: error: %s\n' "${NODE_PROG:-node}" "$*" >&2
  exit 1
}

# Seconds since the script started, for the timings it prints.
elapsed() { echo "$((SECONDS - ${NODE_T0:-0}))s"; }

kc() { "$KUBECTL_BIN" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# The pid recorded for a daemon, if that process still runs the program it was started as.
daemon_pid() {
  local f=$NODE_DIR/pids/$1.pid pid want
  [ -s "$f" ] || return 1
  read -r pid want <"$f"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  [ "$(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -d' ' -f1)" = "$want" ] || return 1
  echo "$pid"
}
