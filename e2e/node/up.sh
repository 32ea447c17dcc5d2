#!/usr/bin/env bash
# make node-up: a real two-node Kubernetes cluster on this machine, without Docker, with
# Tidepool installed on it by the real Helm engine and the e2e lake beside it, so that
# `make e2e` runs against it. lib.sh draws the layout; e2e/README.md ("A local real
# node") says what runs and why.
#
#   1. checks: root, /dev/fuse, the Kubernetes binaries in $TIDEPOOL_NODE_BIN (each missing
#      one named), the runtime packages (apt-get installs what is missing), make images'
#      tarballs, the Helm engine (make deps);
#   2. the images the nodes need beside the product's (images.sh: pause, the CSI sidecars,
#      the Azurite lake image);
#   3. certificates (openssl, one CA), kubeconfigs;
#   4. the control plane in the host's namespaces: etcd, kube-apiserver,
#      kube-controller-manager, kube-scheduler, and the cluster DNS (dns.py);
#   5. two nodes, each in its own network and mount namespaces: containerd, the images
#      imported (ctr -n k8s.io images import), kubelet, kube-proxy; node 1 labelled
#      tidepool.dev/gpu=true;
#   6. the e2e lake (e2e/manifests/azurite.yaml, unchanged) and the chart:
#      helm upgrade --install ... --wait (Helm 4's watcher) with this machine's values.
#
# Run again while the cluster is up, it does only step 6 (after importing the images
# again): `make images node-up` puts rebuilt images on the nodes. A cluster half up (a
# daemon gone) is refused: make node-down first. Every daemon logs to target/node-logs/.
#
# Settings (environment; make node-up passes the Makefile's): TIDEPOOL_NODE_BIN,
# IMAGE_TAG, NODE_IMAGE, OPERATOR_IMAGE, RELEASE, RELEASE_NAMESPACE, NODE_POOL_SIZE.
set -euo pipefail
NODE_PROG=node-up
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NODE_T0=$SECONDS

APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$NODE_REPO/charts/tidepool/Chart.yaml")
IMAGE_TAG=${IMAGE_TAG:-$APP_VERSION}
NODE_IMAGE=${NODE_IMAGE:-ghcr.io/tidepool-dev/tidepool:$IMAGE_TAG}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-ghcr.io/tidepool-dev/tidepool-operator:$IMAGE_TAG}
RELEASE=${RELEASE:-tidepool}
RELEASE_NAMESPACE=${RELEASE_NAMESPACE:-tidepool-system}
# Both nodes' pools share this machine's disk.
NODE_POOL_SIZE=${NODE_POOL_SIZE:-8GiB}
PRODUCT_TARS=("$PRODUCT_IMAGES/tidepool.tar" "$PRODUCT_IMAGES/tidepool-operator.tar")

PKI=$NODE_DIR/pki
KCFG=$NODE_DIR/kubeconfigs

# Once something was started, a failure says how to clean up.
on_exit() {
  local rc=$?
  [ "$rc" = 0 ] && return
  printf '%s: failed after %s; the daemons log to %s/. make node-down removes what was started.\n' \
    "$NODE_PROG" "$(elapsed)" "$NODE_LOGS" >&2
}

# --- 1. checks -----------------------------------------------------------------------------------

check_binaries() {
  local missing=() b
  [ -d "$NODE_BIN" ] || missing=("${NODE_BINARIES[@]}")
  if [ ${#missing[@]} = 0 ]; then
    for b in "${NODE_BINARIES[@]}"; do
      [ -x "$NODE_BIN/$b" ] || missing+=("$b")
    done
  fi
  if [ ${#missing[@]} != 0 ]; then
    {
      echo "node-up: error: the local node needs these Kubernetes binaries, under their upstream names, in"
      if [ -n "${TIDEPOOL_NODE_BIN:-}" ]; then
        echo "  TIDEPOOL_NODE_BIN=$NODE_BIN"
      else
        echo "  $NODE_BIN (the default: TIDEPOOL_NODE_BIN is not set; set it to the directory holding them)"
      fi
      echo "and these are missing:"
      for b in "${missing[@]}"; do echo "  - $b"; done
      echo "Kubernetes >= 1.33 server binaries (etcd 3.5/3.6, kube-apiserver, kube-controller-manager,"
      echo "kube-scheduler, kubelet, kube-proxy, kubectl) and kubernetes-csi's csi-node-driver-registrar and"
      echo "livenessprobe: see e2e/README.md, \"A local real node\", for where they come from. Nothing was started."
    } >&2
    exit 1
  fi
  local v minor
  v=$("$NODE_BIN/kubelet" --version 2>/dev/null | awk '{print $2}') || true
  minor=$(echo "$v" | sed -n 's/^v1\.\([0-9]*\)\..*/\1/p')
  [ -n "$minor" ] && [ "$minor" -ge 33 ] ||
    die "$NODE_BIN/kubelet is ${v:-of unknown version}; Tidepool needs Kubernetes >= 1.33 (see e2e/README.md)"
  KUBE_VERSION=$v
  for b in kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do
    local bv
    bv=$("$NODE_BIN/$b" --version 2>/dev/null | awk '{print $2}') || true
    [ "$bv" = "$v" ] || die "$NODE_BIN/$b is ${bv:-of unknown version}, kubelet is $v: use binaries of one release"
  done
  ETCD_VERSION=$("$NODE_BIN/etcd" --version 2>/dev/null | sed -n 's/^etcd Version: *//p')
}

check_packages() {
  local missing=() p
  command -v containerd >/dev/null && command -v ctr >/dev/null && command -v containerd-shim-runc-v2 >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  for p in bridge host-local loopback portmap; do
    [ -x "/usr/lib/cni/$p" ] || { missing+=(containernetworking-plugins); break; }
  done
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v nsenter >/dev/null && command -v unshare >/dev/null || missing+=(util-linux)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  [ -x /usr/bin/python3 ] || missing+=(python3)
  # images.sh: buildah builds the node's own images; the pause program is C, linked static.
  command -v buildah >/dev/null || missing+=(buildah)
  command -v gcc >/dev/null && [ "$(gcc -print-file-name=libc.a)" != libc.a ] || missing+=(gcc libc6-dev)
  [ ${#missing[@]} = 0 ] && return
  command -v apt-get >/dev/null || die "missing ${missing[*]}, and no apt-get here to install them (Debian packages)"
  say "installing ${missing[*]} (apt)"
  # containerd's package would start its service where systemd runs; nothing here uses it.
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
    die "apt-get could not install ${missing[*]} (Debian bookworm: main)"
}

preflight() {
  [ "$(id -u)" = 0 ] || die "needs root: it starts kubelet, containerd and network namespaces (sudo make node-up)"
  [ -e /dev/fuse ] || die "/dev/fuse is missing: Tidepool's volumes are FUSE mounts (modprobe fuse)"
  check_binaries
  check_packages
  local t
  for t in "${PRODUCT_TARS[@]}"; do
    [ -s "$t" ] || die "$t is missing: run make images first (it builds both images without Docker here)"
  done
  [ -x "$HELM_VENV/bin/python" ] || die "the Helm engine is missing ($HELM_VENV): run make deps"
  grep -q ' /sys/fs/cgroup ' /proc/self/mountinfo || die "no cgroup file system at /sys/fs/cgroup"
}

# --- processes -----------------------------------------------------------------------------------

# start_daemon NAME [--in HOLDER_PID] PROGRAM ARGS...: in its own session, logging to
# target/node-logs/NAME.log; pid and program in pids/NAME.pid.
start_daemon() {
  local name=$1 holder=
  shift
  if [ "$1" = --in ]; then
    holder=$2
    shift 2
  fi
  local log=$NODE_LOGS/$name.log
  printf '\n=== %s: %s\n' "$(date -Is)" "$*" >>"$log"
  if [ -n "$holder" ]; then
    (exec setsid nsenter --target "$holder" --mount --net -- "$@" </dev/null >>"$log" 2>&1) &
  else
    (exec setsid "$@" </dev/null >>"$log" 2>&1) &
  fi
  echo "$! $1" >"$NODE_DIR/pids/$name.pid"
}

# wait_for DESCRIPTION SECONDS LOG COMMAND...: until COMMAND succeeds; on timeout, the
# end of LOG and a failure.
wait_for() {
  local what=$1 secs=$2 log=$3 i
  shift 3
  for ((i = 0; i < secs * 2; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  if [ -n "$log" ] && [ -f "$log" ]; then
    echo "--- the end of $log:" >&2
    tail -n 30 "$log" >&2
  fi
  die "$what: not done after ${secs}s"
}

alive() { daemon_pid "$1" >/dev/null; }

# --- 3. certificates and kubeconfigs ---------------------------------------------------------

ca() {
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -subj "/CN=tidepool-node-ca" \
    -config <(printf '[req]\ndistinguished_name=dn\nx509_extensions=v3\n[dn]\n[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\n') 2>/dev/null
}

# cert NAME CN ORG EKU [SAN]: a key and a certificate signed by the CA.
cert() {
  local name=$1 cn=$2 org=$3 eku=$4 san=${5:-} subj
  subj="/CN=$cn"
  [ -z "$org" ] || subj="/O=$org$subj"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subj" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -CAserial "$PKI/ca.srl" -days 30 -out "$PKI/$name.crt" -extfile <(
      printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' "$eku"
      [ -z "$san" ] || printf 'subjectAltName=%s\n' "$san"
    ) 2>/dev/null
  rm -f "$PKI/$name.csr"
}

# kubeconfig FILE CERT: the API server, the CA and the client certificate, embedded.
kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tidepool-node
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$2.crt")
    client-key-data: $(base64 -w0 <"$PKI/$2.key")
contexts:
- name: tidepool-node
  context:
    cluster: tidepool-node
    user: $2
current-context: tidepool-node
EOF
  chmod 0600 "$1"
}

make_pki() {
  mkdir -p "$PKI" "$KCFG"
  chmod 0700 "$PKI"
  ca
  local svc_names="DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN,DNS:localhost"
  cert apiserver kube-apiserver "" serverAuth "$svc_names,IP:$KUBERNETES_SVC_IP,IP:$CP_IP,IP:127.0.0.1"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters clientAuth
  # The service account token keys (ES256).
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/sa.key" 2>/dev/null
  openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  cert admin tidepool-node-admin system:masters clientAuth
  cert controller-manager system:kube-controller-manager "" clientAuth
  cert scheduler system:kube-scheduler "" clientAuth
  cert dns tidepool-node-dns "" clientAuth
  local i name
  for ((i = 1; i <= NODE_COUNT; i++)); do
    name=$(node_name "$i")
    cert "$name-kubelet" "system:node:$name" system:nodes clientAuth
    cert "$name-serving" "$name" "" serverAuth "DNS:$name,IP:$(node_ip "$i")"
    cert "$name-proxy" system:kube-proxy "" clientAuth
    kubeconfig "$KCFG/$name-kubelet" "$name-kubelet"
    kubeconfig "$KCFG/$name-proxy" "$name-proxy"
  done
  kubeconfig "$KUBECONFIG_ADMIN" admin
  kubeconfig "$KCFG/controller-manager" controller-manager
  kubeconfig "$KCFG/scheduler" scheduler
}

# --- 4. host network and control plane -------------------------------------------------------

record() { echo "$*" >>"$NODE_DIR/host-changes"; }

host_network() {
  ip addr add "$CP_IP/32" dev lo && record "addr $CP_IP/32 lo"
  # Nothing of the cluster's ranges leaves through this machine's own routes: the more
  # specific routes (each node's veth and pods) win, the rest is unreachable.
  local r
  for r in "$CLUSTER_CIDR" "$NODE_NET" "$SERVICE_CIDR"; do
    ip route add unreachable "$r" && record "route unreachable $r"
  done
  # The host routes between the two nodes (and to the API server and DNS).
  local fwd
  fwd=$(cat /proc/sys/net/ipv4/ip_forward)
  if [ "$fwd" != 1 ]; then
    record "sysctl net.ipv4.ip_forward $fwd"
    sysctl -qw net.ipv4.ip_forward=1
  fi
  # Forwarding between the nodes' veths, where the host's FORWARD chain drops by default.
  local policy
  policy=$(iptables -w 10 -S FORWARD) || die "iptables -S FORWARD failed (see above): cannot tell whether the host forwards between the nodes"
  if [ "${policy%%$'\n'*}" != "-P FORWARD ACCEPT" ]; then
    iptables -I FORWARD -i tp-node+ -o tp-node+ -m comment --comment tidepool-node -j ACCEPT
    record "iptables FORWARD -i tp-node+ -o tp-node+ -m comment --comment tidepool-node -j ACCEPT"
  fi
}

control_plane() {
  say "control plane: etcd $ETCD_VERSION, kube-apiserver $KUBE_VERSION on $APISERVER_URL"
  start_daemon etcd "$NODE_BIN/etcd" --name tidepool-node --data-dir "$NODE_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "tidepool-node=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level warn
  wait_for "etcd healthy" 60 "$NODE_LOGS/etcd.log" curl -sf "http://127.0.0.1:$ETCD_CLIENT_PORT/health"

  start_daemon kube-apiserver "$NODE_BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --bind-address="$CP_IP" --advertise-address="$CP_IP" --secure-port="$APISERVER_PORT" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer="https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --profiling=false --v=1
  wait_for "kube-apiserver ready" 120 "$NODE_LOGS/kube-apiserver.log" kc get --raw=/readyz

  start_daemon kube-controller-manager "$NODE_BIN/kube-controller-manager" \
    --kubeconfig="$KCFG/controller-manager" --authentication-kubeconfig="$KCFG/controller-manager" \
    --authorization-kubeconfig="$KCFG/controller-manager" \
    --bind-address="$CP_IP" --secure-port=10257 --leader-elect=false \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --use-service-account-credentials=true --cluster-name=tidepool-node --profiling=false --v=1
  start_daemon kube-scheduler "$NODE_BIN/kube-scheduler" \
    --kubeconfig="$KCFG/scheduler" --authentication-kubeconfig="$KCFG/scheduler" \
    --authorization-kubeconfig="$KCFG/scheduler" \
    --bind-address="$CP_IP" --secure-port=10259 --leader-elect=false --profiling=false --v=1

  # The cluster DNS reads Services and EndpointSlices, nothing else.
  kc apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: tidepool-node-dns
rules:
  - apiGroups: [""]
    resources: [services]
    verbs: [get, list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: tidepool-node-dns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: tidepool-node-dns
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: User
    name: tidepool-node-dns
EOF
  start_daemon dns /usr/bin/python3 "$NODE_SCRIPTS/dns.py" --listen "$CP_IP" --port 53 \
    --server "$APISERVER_URL" --ca "$PKI/ca.crt" --cert "$PKI/dns.crt" --key "$PKI/dns.key" \
    --domain "$CLUSTER_DOMAIN"
  wait_for "the cluster DNS answering" 30 "$NODE_LOGS/dns.log" \
    /usr/bin/python3 -c "
import socket, struct, sys
q = struct.pack('!HHHHHH', 7, 0x0100, 1, 0, 0, 0) + b''.join(bytes([len(p)]) + p.encode() for p in 'kubernetes.default.svc.$CLUSTER_DOMAIN'.split('.')) + b'\0' + struct.pack('!HH', 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); s.sendto(q, ('$CP_IP', 53))
r = s.recv(512); sys.exit(0 if r[3] & 0xF == 0 and r[7] >= 1 else 1)"
}

# --- 5. nodes --------------------------------------------------------------------------------------

# The cgroup hierarchies (v1 controllers and named ones, or the v2 root).
cgroup_mounts() {
  awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo | grep '^/sys/fs/cgroup'
}

make_cgroup_root() {
  local cg=$1 m
  while read -r m; do
    mkdir -p "$m$cg"
    # A new cpuset cgroup has no CPUs and no memory nodes until given its parent's.
    if [ -f "$m/cpuset.cpus" ] && [ -z "$(cat "$m$cg/cpuset.cpus")" ]; then
      cat "$m/cpuset.cpus" >"$m$cg/cpuset.cpus"
      cat "$m/cpuset.mems" >"$m$cg/cpuset.mems"
    fi
  done < <(cgroup_mounts)
}

write_node_config() {
  local i=$1 d name ip
  d=$(node_dir "$i")
  name=$(node_name "$i")
  ip=$(node_ip "$i")
  cat >"$d/containerd.toml" <<EOF
# containerd of $name (e2e/node/up.sh). Paths are the node's own: its mount namespace has
# its directories over /var/lib/containerd and /run/containerd.
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This machine's root lacks CAP_SYS_RESOURCE: without this every sandbox fails with
  # "nsexec: failed to update /proc/self/oom_score_adj".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni-conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"
EOF
  mkdir -p "$d/cni-conf"
  cat >"$d/cni-conf/10-tidepool-node.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "tidepool-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "tp-br0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$(node_pod_cidr "$i")", "gateway": "$(node_pod_gw "$i")" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $PKI/ca.crt
authorization:
  mode: Webhook
tlsCertFile: $PKI/$name-serving.crt
tlsPrivateKeyFile: $PKI/$name-serving.key
address: $ip
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: $(node_cgroup "$i")
cgroupsPerQOS: true
# This machine has cgroup v1 (kubelet 1.35 drops it; 1.34 runs on it when told so).
failCgroupV1: false
failSwapOn: false
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$CP_IP]
resolvConf: $NODE_DIR/resolv.conf
# Not under /usr/libexec on the host.
volumePluginDir: $d/volume-plugins
# The two nodes share this machine's disk (and its free space is under kubelet's default
# 15% for images): evict only when it is really full, and never collect the imported
# images (nothing can pull them again).
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1Gi
  imagefs.available: 1Gi
  nodefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
rotateCertificates: false
serverTLSBootstrap: false
EOF
  cat >"$d/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $KCFG/$name-proxy
hostnameOverride: $name
bindAddress: 0.0.0.0
clusterCIDR: $CLUSTER_CIDR
mode: iptables
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# Leave the conntrack table size alone (a host-wide setting).
conntrack:
  maxPerCore: 0
EOF
}

start_node() {
  local i=$1 d name holder veth host_ip ip b sysctl_args=() bind_args=() host_path sub
  d=$(node_dir "$i")
  name=$(node_name "$i")
  veth=$(node_veth "$i")
  host_ip=$(node_host_ip "$i")
  ip=$(node_ip "$i")
  say "$name: network and mount namespaces, node IP $ip, pods $(node_pod_cidr "$i"), cgroup root $(node_cgroup "$i")"
  mkdir -p "$d/sysctl" "$d/volume-plugins"
  for b in "${NODE_BINDS[@]}"; do
    read -r host_path sub <<<"$b"
    mkdir -p "$d/$sub"
    if [ ! -e "$host_path" ]; then
      # The mount point on the host: an empty directory, removed by node-down.
      local top=$host_path
      while [ ! -e "$(dirname "$top")" ]; do top=$(dirname "$top"); done
      mkdir -p "$host_path"
      grep -qxF "dir $top" "$NODE_DIR/host-changes" 2>/dev/null || record "dir $top"
    fi
    bind_args+=(--bind "$host_path=$d/$sub")
  done
  for b in "${KUBELET_SYSCTLS[@]}"; do
    read -r host_path sub <<<"$b"
    echo "$sub" >"$d/sysctl/${host_path//\//.}"
    sysctl_args+=(--sysctl "$host_path=$d/sysctl/${host_path//\//.}")
  done
  make_cgroup_root "$(node_cgroup "$i")"
  record "cgroup $(node_cgroup "$i")"
  write_node_config "$i"

  rm -f "$d/ready"
  start_daemon "$name-ns" unshare --net --mount --propagation private -- \
    /bin/bash "$NODE_SCRIPTS/node-ns.sh" "$name" "$d/ready" "${bind_args[@]}" "${sysctl_args[@]}"
  wait_for "$name's namespaces" 20 "$NODE_LOGS/$name-ns.log" test -e "$d/ready"
  holder=$(awk '{print $1}' "$NODE_DIR/pids/$name-ns.pid")
  echo "$holder tidepool-node-ns:$name" >"$NODE_DIR/pids/$name-ns.pid"
  wait_for "$name's namespace holder" 10 "" alive "$name-ns"

  ip link add "$veth" type veth peer name eth0 netns "$holder"
  ip addr add "$host_ip/24" dev "$veth"
  ip link set "$veth" up
  ip route add "$(node_pod_cidr "$i")" via "$ip" dev "$veth"
  local in_node=(nsenter --target "$holder" --net --mount --)
  "${in_node[@]}" ip addr add "$ip/24" dev eth0
  "${in_node[@]}" ip link set eth0 up
  # No default route: a node reaches the host (API server, DNS), the other node and its
  # pods, nothing else.
  for r in "$CP_IP/32" "$CLUSTER_CIDR" "$SERVICE_CIDR" "$NODE_NET"; do
    "${in_node[@]}" ip route add "$r" via "$host_ip" dev eth0
  done
  "${in_node[@]}" sysctl -qw net.ipv4.ip_forward=1
  # Pods reaching a Service whose endpoint is on the same bridge: kube-proxy's DNAT must
  # see bridged packets.
  "${in_node[@]}" sysctl -qw net.bridge.bridge-nf-call-iptables=1

  start_daemon "$name-containerd" --in "$holder" "$(command -v containerd)" --config "$d/containerd.toml"
  wait_for "$name's containerd" 30 "$NODE_LOGS/$name-containerd.log" \
    "${in_node[@]}" ctr --address /run/containerd/containerd.sock version
}

import_images() {
  local i=$1 holder name t
  name=$(node_name "$i")
  holder=$(daemon_pid "$name-ns") || die "$name is not running"
  for t in "${PRODUCT_TARS[@]}" "$NODE_IMAGES"/{pause,registrar,liveness,azurite}.tar; do
    nsenter --target "$holder" --net --mount -- ctr --address /run/containerd/containerd.sock \
      -n k8s.io images import --snapshotter overlayfs "$t" >>"$NODE_LOGS/$name-images.log" 2>&1 ||
      die "importing $t into $name's containerd failed (see $NODE_LOGS/$name-images.log)"
  done
}

start_kubelet_and_proxy() {
  local i=$1 holder name d labels=()
  name=$(node_name "$i")
  d=$(node_dir "$i")
  holder=$(daemon_pid "$name-ns")
  [ "$i" != 1 ] || labels=(--node-labels="$GPU_LABEL")
  start_daemon "$name-kubelet" --in "$holder" "$NODE_BIN/kubelet" --config="$d/kubelet.yaml" \
    --kubeconfig="$KCFG/$name-kubelet" --hostname-override="$name" --node-ip="$(node_ip "$i")" \
    "${labels[@]}" --v=2
  start_daemon "$name-kube-proxy" --in "$holder" "$NODE_BIN/kube-proxy" --config="$d/kube-proxy.yaml" --v=1
}

nodes_ready() {
  local ready
  ready=$(kc get nodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c ' True$') || true
  [ "$ready" = "$NODE_COUNT" ]
}

# --- 6. the lake and the chart ---------------------------------------------------------------

deploy() {
  # shellcheck source=/dev/null
  source "$NODE_IMAGES/versions"
  say "the e2e lake: kubectl apply -f e2e/manifests/azurite.yaml"
  kc apply -f "$NODE_REPO/e2e/manifests/azurite.yaml"
  say "helm upgrade --install $RELEASE charts/tidepool -n $RELEASE_NAMESPACE --wait (Helm $("$NODE_HELM" version --short) through helm-python-sdk)"
  # raiseFileLimit=false: this machine's root lacks CAP_SYS_RESOURCE, so a container asking
  # for it does not start. The sidecars are the ones images.sh built. The e2e lake is
  # Azurite over plain HTTP, which the agents open only when allowed by name.
  local t0=$SECONDS
  KUBECONFIG=$KUBECONFIG_ADMIN "$NODE_HELM" upgrade --install "$RELEASE" "$NODE_REPO/charts/tidepool" \
    -n "$RELEASE_NAMESPACE" --create-namespace \
    --set operator.image.tag="$IMAGE_TAG" --set node.image.tag="$IMAGE_TAG" \
    --set node.pool.size="$NODE_POOL_SIZE" \
    --set node.agent.raiseFileLimit=false \
    --set-json "node.lake.allowedEndpoints=[\"$E2E_LAKE_ENDPOINT\"]" \
    --set node.registrar.image.repository="$REGISTRAR_REPO" --set node.registrar.image.tag="$REGISTRAR_VERSION" \
    --set node.livenessProbe.image.repository="$LIVENESS_REPO" --set node.livenessProbe.image.tag="$LIVENESS_VERSION" \
    --wait --timeout 10m ||
    die "helm upgrade --install failed after $((SECONDS - t0))s; kubectl get pods -A and target/node-logs/ tell why (KUBECONFIG=$KUBECONFIG_ADMIN)"
  say "installed in $((SECONDS - t0))s"
  kc -n tidepool-e2e rollout status deployment/azurite --timeout=300s
}

summary() {
  cat <<EOF

node-up: the local cluster is up ($(elapsed)): Kubernetes $KUBE_VERSION, two nodes:
$(kc get nodes -L tidepool.dev/gpu -o wide | sed 's/^/  /')
Tidepool: release $RELEASE in $RELEASE_NAMESPACE; the e2e lake: Azurite in tidepool-e2e.

  export KUBECONFIG=$KUBECONFIG_ADMIN
  $KUBECTL_BIN get pods -A       # kubectl of TIDEPOOL_NODE_BIN
  $NODE_HELM status $RELEASE -n $RELEASE_NAMESPACE

make e2e        runs the suite here (it takes this kubeconfig, kubectl and helm while the cluster is up)
make node-down  stops everything and removes it; the daemons' logs stay in target/node-logs/
EOF
}

# --- main --------------------------------------------------------------------------------------

preflight

all_alive() {
  local n i
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler dns; do alive "$n" || return 1; done
  for ((i = 1; i <= NODE_COUNT; i++)); do
    for n in ns containerd kubelet kube-proxy; do alive "$(node_name "$i")-$n" || return 1; done
  done
}

if [ -d "$NODE_DIR" ]; then
  all_alive || die "a cluster of an earlier node-up is here ($NODE_DIR) but not all of its daemons run: make node-down first (its logs: $NODE_LOGS/)"
  say "the local cluster is up already: importing the images again and upgrading the release"
  bash "$NODE_SCRIPTS/images.sh"
  for ((i = 1; i <= NODE_COUNT; i++)); do import_images "$i"; done
  deploy
  summary
  exit 0
fi
# Leftovers of a cluster whose state directory is gone: a cluster of another checkout that
# still runs (its nodes' namespace holders, or a server on the control plane's address) is
# left alone; leftovers whose processes are all gone (a run killed before its node-down, or
# a checkout removed under it) are removed by node-down before going on.
leftovers() { cp_ip_on_lo || ip link show "$(node_veth 1)" >/dev/null 2>&1; }
running_elsewhere() {
  local p
  for p in /proc/[0-9]*; do
    case $({ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null) in "tidepool-node-ns:"*) echo "${p#/proc/}" ;; esac
  done
  ss -Hltnp "src $CP_IP" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 || true
}
if leftovers; then
  live=$(running_elsewhere | sort -un | tr '\n' ' ')
  [ -z "$live" ] || die "$CP_IP is on lo or $(node_veth 1) exists, and processes of a local cluster still run (pids $live): another checkout's node-up, or what a killed run here left running; make node-down stops them"
  say "$CP_IP is on lo or $(node_veth 1) exists, with no process of a cluster left: leftovers of a node-up that ended without its node-down; removing them (make node-down)"
  bash "$NODE_SCRIPTS/down.sh"
  leftovers && die "make node-down did not remove the leftovers of an earlier node-up ($CP_IP on lo or $(node_veth 1)); see its output above"
fi

trap on_exit EXIT
say "Kubernetes $KUBE_VERSION from $NODE_BIN; images $NODE_IMAGE, $OPERATOR_IMAGE"
bash "$NODE_SCRIPTS/images.sh"
if [ -d "$NODE_LOGS" ]; then
  rm -rf "$NODE_LOGS.prev"
  mv "$NODE_LOGS" "$NODE_LOGS.prev"
fi
mkdir -p "$NODE_DIR/pids" "$NODE_LOGS"
: >"$NODE_DIR/host-changes"
printf 'nameserver %s\noptions ndots:5\n' "$CP_IP" >"$NODE_DIR/resolv.conf"

make_pki
host_network
control_plane
for ((i = 1; i <= NODE_COUNT; i++)); do
  start_node "$i"
  import_images "$i"
  start_kubelet_and_proxy "$i"
done
say "waiting for both nodes to be Ready ($(elapsed) so far)"
wait_for "both nodes Ready" 180 "$NODE_LOGS/$(node_name 1)-kubelet.log" nodes_ready
deploy
summary
