# Tidepool. `make demo` and `make test` do all set-up on a fresh Debian machine.
SHELL := /bin/bash
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help deps demo test sanity soak envtest generate check-generated bench bench-scale images images-test kind-up kind-down deploy e2e node-up node-down

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# The Helm engine the chart tests use: Helm 4's Go SDK as a shared library, from PyPI
# (no helm binary is needed), in a project-local venv. Pinned: operator/tests/chart.rs
# checks the version.
HELM_SDK_VERSION := 0.2.2
HELM_VENV := .tools/helm-venv
# Python's gRPC (the C core), for the interop test of the plugin's socket
# (csi-driver/tests/csi.rs). Pinned.
GRPCIO_VERSION := 1.85.4
GRPCIO_VENV := .tools/grpcio-venv

deps: ## install what the tests and demo need: fuse3 and openssl (apt), Azurite (npm, pinned, project-local), the Helm engine (PyPI helm-python-sdk, pinned, .tools/helm-venv), grpcio (PyPI, pinned, .tools/grpcio-venv)
	@command -v fusermount3 >/dev/null && command -v openssl >/dev/null || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq fuse3 openssl >/dev/null; }
	@[ -e /dev/fuse ] || { echo "error: /dev/fuse is missing; load the fuse module (modprobe fuse) or run the container with --device /dev/fuse"; exit 1; }
	@[ -x node_modules/.bin/azurite-blob ] || npm ci --no-audit --no-fund --loglevel=error
	@$(HELM_VENV)/bin/python -c 'import sys, helm_python; sys.exit(helm_python.__version__ != "$(HELM_SDK_VERSION)")' 2>/dev/null || { \
	  python3 -c 'import venv, ensurepip' 2>/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null; }; \
	  rm -rf $(HELM_VENV) && python3 -m venv $(HELM_VENV) && \
	  $(HELM_VENV)/bin/pip install -q --disable-pip-version-check helm-python-sdk==$(HELM_SDK_VERSION); }
	@$(GRPCIO_VENV)/bin/python -c 'import sys, grpc; sys.exit(grpc.__version__ != "$(GRPCIO_VERSION)")' 2>/dev/null || { \
	  rm -rf $(GRPCIO_VENV) && python3 -m venv $(GRPCIO_VENV) && \
	  $(GRPCIO_VENV)/bin/pip install -q --disable-pip-version-check grpcio==$(GRPCIO_VERSION); }

test: deps ## unit, property, Azurite and FUSE tests (FUSE tests need root and /dev/fuse)
	$(CARGO) test --workspace --locked --no-fail-fast

demo: deps ## Azurite lake -> tidepool mount -> read + verify everything, cold vs warm
	$(CARGO) build --release --locked -p tidepool-csi --bin tidepool --example demo
	TIDEPOOL_BIN=$(CURDIR)/target/release/tidepool ./target/release/examples/demo

sanity: deps ## CSI conformance of `tidepool csi` + `tidepool agent` over the real socket (Rust suite; plus upstream csi-sanity when on PATH or in $$CSI_SANITY)
	$(CARGO) test --locked -p tidepool-csi --test csi -- --nocapture

envtest: ## only the tests against a real kube-apiserver (binaries from $$KUBEBUILDER_ASSETS or setup-envtest's directory)
	$(CARGO) test --locked -p tidepool-api --test apiserver
	$(CARGO) test --locked -p tidepool-operator --test envtest
	$(CARGO) test --locked -p tidepool-csi --test agent_envtest

soak: deps ## the read stress test and the checkpoint fault harness, each for 10 minutes (SOAK_SECS=N to change); TIDEPOOL_FAULT_SEED replays a harness run
	TIDEPOOL_STRESS_SECS=$(or $(SOAK_SECS),600) $(CARGO) test --locked -p tidepool-csi --test stress -- --nocapture
	TIDEPOOL_FAULT_SECS=$(or $(SOAK_SECS),600) $(CARGO) test --locked -p tidepool-csi --test checkpoint_faults -- --nocapture

generate: ## regenerate CRD YAML in crds/ and charts/tidepool/crds/
	$(CARGO) run -q --locked -p tidepool-api --bin crdgen

check-generated: ## fail if committed CRD YAML differs from the types
	$(CARGO) run -q --locked -p tidepool-api --bin crdgen -- --check

bench: deps ## speed report: warm vs local disk, cold vs SDK download, small files -> bench-report.json
	$(CARGO) build --release --locked -p tidepool-csi --bin tidepool --example bench
	TIDEPOOL_BIN=$(CURDIR)/target/release/tidepool ./target/release/examples/bench

bench-scale: ## the bench's scale section alone: a 10-million-object dataset opened into an empty pool (TIDEPOOL_BENCH_SCALE_OBJECTS) -> bench-report.json
	$(CARGO) build --release --locked -p tidepool-csi --example bench
	TIDEPOOL_BENCH_ONLY=scale ./target/release/examples/bench

# Cluster targets: `make images kind-up deploy e2e` builds the images, creates a local kind
# cluster, installs Tidepool and the e2e lake on it, and runs the end-to-end suite. Each
# says what is missing (Docker, kind, helm, kubectl, a cluster) and exits non-zero: none
# ever reports a pass it did not run.
#
# The images are the repositories charts/tidepool/values.yaml names, tagged with the
# chart's appVersion (the chart's default tag), so the chart finds them unchanged.
APP_VERSION := $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$$/\1/p' charts/tidepool/Chart.yaml)
IMAGE_TAG ?= $(APP_VERSION)
OPERATOR_REPO := ghcr.io/tidepool-dev/tidepool-operator
NODE_REPO := ghcr.io/tidepool-dev/tidepool
OPERATOR_IMAGE := $(OPERATOR_REPO):$(IMAGE_TAG)
NODE_IMAGE := $(NODE_REPO):$(IMAGE_TAG)
DOCKER ?= docker
KIND ?= kind
HELM ?= helm
KUBECTL ?= kubectl
KIND_CLUSTER ?= tidepool
KIND_CONTEXT := kind-$(KIND_CLUSTER)
# Empty: kind's default node image (Kubernetes >= 1.33 from kind v0.29 on); or pin one with
# its digest from your kind release's notes: KIND_NODE_IMAGE=kindest/node:v1.33.x@sha256:...
KIND_NODE_IMAGE ?=
# The host directories kind-config.yaml mounts as each worker's pool (keep the two in step).
KIND_POOLS := /tmp/tidepool-kind/worker-1 /tmp/tidepool-kind/worker-2
RELEASE ?= tidepool
RELEASE_NAMESPACE ?= tidepool-system
# A pool far smaller than the chart's 100GiB default: the host directories live in /tmp.
KIND_POOL_SIZE ?= 8GiB

define need_docker
	@command -v $(DOCKER) >/dev/null || { echo "make $@: docker is not installed here; it is needed $(1)."; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make $@: docker is installed but its daemon does not answer here (docker info fails); it is needed $(1): start the daemon, or run this where Docker runs."; exit 1; }
endef

define need_tool
	@command -v $(1) >/dev/null || { echo "make $@: $(1) is not installed here; $(2)"; exit 1; }
endef

images: ## build the two container images (Dockerfile targets operator and node) as the chart names them, tagged with its appVersion, into target/images/tidepool.tar and tidepool-operator.tar (docker-archive): docker build + docker save where Docker's daemon answers (DOCKER_BUILD_ARGS for --build-arg), else buildah on a locally made Debian base (root; e2e/images/build.sh)
	@grep -q 'repository: $(OPERATOR_REPO)$$' charts/tidepool/values.yaml && grep -q 'repository: $(NODE_REPO)$$' charts/tidepool/values.yaml || { \
	  echo "make $@: charts/tidepool/values.yaml no longer names $(OPERATOR_REPO) and $(NODE_REPO); update OPERATOR_REPO/NODE_REPO in the Makefile"; exit 1; }
	NODE_IMAGE='$(NODE_IMAGE)' OPERATOR_IMAGE='$(OPERATOR_IMAGE)' IMAGE_TAG='$(IMAGE_TAG)' DOCKER='$(DOCKER)' CARGO='$(CARGO)' bash e2e/images/build.sh

images-test: ## check the tarballs of make images as a cluster takes them: import into a private containerd, ctr run (versions, entrypoints, users, fusermount3); root (e2e/images/test.sh)
	NODE_IMAGE='$(NODE_IMAGE)' OPERATOR_IMAGE='$(OPERATOR_IMAGE)' IMAGE_TAG='$(IMAGE_TAG)' bash e2e/images/test.sh

kind-up: ## create the local kind cluster of kind-config.yaml (one control plane, two workers, worker 1 labelled tidepool.dev/gpu=true) and its host pool directories
	$(call need_docker,to run the kind nodes (Docker containers))
	$(call need_tool,$(KIND),see https://kind.sigs.k8s.io/docs/user/quick-start/#installation)
	@[ -e /dev/fuse ] || echo "make $@: warning: /dev/fuse is missing on this host; Tidepool's volumes are FUSE mounts made in the kind nodes, which share the kernel of the machine Docker runs on (modprobe fuse there)"
	mkdir -p $(KIND_POOLS)
	@if $(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)'; then \
	  echo "kind cluster $(KIND_CLUSTER) exists already (make kind-down removes it)"; \
	else \
	  $(KIND) create cluster --name $(KIND_CLUSTER) --config kind-config.yaml $(if $(KIND_NODE_IMAGE),--image $(KIND_NODE_IMAGE)) --wait 180s; \
	fi

kind-down: ## delete the local kind cluster and its host pool directories
	$(call need_tool,$(KIND),see https://kind.sigs.k8s.io/docs/user/quick-start/#installation)
	$(KIND) delete cluster --name $(KIND_CLUSTER)
	$(SUDO) rm -rf $(KIND_POOLS)

# Without Docker: a local real cluster (e2e/node/, e2e/README.md "A local real node"). The
# control plane in this machine's namespaces and two nodes (containerd, kubelet, kube-proxy),
# each in network and mount namespaces of its own, from the Kubernetes binaries in
# TIDEPOOL_NODE_BIN (default /opt/tidepool-node-bin); the images of make images imported;
# the chart installed by the real Helm engine (Helm 4's Go SDK, helm-python-sdk: --wait)
# and the e2e lake applied. make e2e then finds its kubeconfig. Root.
NODE_POOL_SIZE ?= 8GiB
NODE_KUBECONFIG := $(CURDIR)/target/node/kubeconfig
NODE_BIN_DIR := $(or $(TIDEPOOL_NODE_BIN),/opt/tidepool-node-bin)

node-up: deps ## a local two-node cluster without Docker (Kubernetes binaries from $$TIDEPOOL_NODE_BIN, default /opt/tidepool-node-bin) with the images of make images, the chart (Helm 4 engine, --wait) and the e2e lake; root (e2e/node/up.sh)
	$(if $(TIDEPOOL_NODE_BIN),TIDEPOOL_NODE_BIN='$(TIDEPOOL_NODE_BIN)') IMAGE_TAG='$(IMAGE_TAG)' NODE_IMAGE='$(NODE_IMAGE)' OPERATOR_IMAGE='$(OPERATOR_IMAGE)' \
	  RELEASE='$(RELEASE)' RELEASE_NAMESPACE='$(RELEASE_NAMESPACE)' NODE_POOL_SIZE='$(NODE_POOL_SIZE)' bash e2e/node/up.sh

node-down: ## stop and remove the cluster of make node-up; fails if any process, mount, cgroup, veth, route or iptables rule of it is left (logs stay in target/node-logs)
	$(if $(TIDEPOOL_NODE_BIN),TIDEPOOL_NODE_BIN='$(TIDEPOOL_NODE_BIN)') bash e2e/node/down.sh

deploy: ## load the images into the kind cluster, install the chart (release tidepool in tidepool-system) and the e2e lake (e2e/manifests/azurite.yaml); run make images kind-up first
	$(call need_docker,to load the images into the kind nodes)
	$(call need_tool,$(KIND),see https://kind.sigs.k8s.io/docs/user/quick-start/#installation)
	$(call need_tool,$(HELM),install Helm 3 or 4: https://helm.sh/docs/intro/install/ (the chart tests' helm-python-sdk has no CLI))
	$(call need_tool,$(KUBECTL),install kubectl: https://kubernetes.io/docs/tasks/tools/)
	@$(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)' || { echo "make $@: there is no kind cluster $(KIND_CLUSTER); run make kind-up first"; exit 1; }
	@$(DOCKER) image inspect $(OPERATOR_IMAGE) $(NODE_IMAGE) >/dev/null 2>&1 || { echo "make $@: $(OPERATOR_IMAGE) or $(NODE_IMAGE) is not built; run make images first"; exit 1; }
	$(KIND) load docker-image --name $(KIND_CLUSTER) $(OPERATOR_IMAGE) $(NODE_IMAGE)
	$(KUBECTL) --context $(KIND_CONTEXT) apply -f e2e/manifests/azurite.yaml
	$(HELM) upgrade --install $(RELEASE) charts/tidepool --kube-context $(KIND_CONTEXT) \
	  -n $(RELEASE_NAMESPACE) --create-namespace \
	  --set operator.image.tag=$(IMAGE_TAG) --set node.image.tag=$(IMAGE_TAG) \
	  --set node.pool.size=$(KIND_POOL_SIZE) \
	  --set-json 'node.lake.allowedEndpoints=["http://azurite.tidepool-e2e.svc.cluster.local:10000"]' \
	  --wait --timeout 10m
	$(KUBECTL) --context $(KIND_CONTEXT) -n tidepool-e2e rollout status deployment/azurite --timeout=300s

# While make node-up's cluster is up and KUBECONFIG is not set (or names its kubeconfig),
# make e2e tests that cluster, with its own kubectl (TIDEPOOL_NODE_BIN's, of the cluster's
# release) and helm (e2e/node/helm, the Helm 4 engine that installed it) unless KUBECTL or
# HELM is given.
ifeq ($(if $(filter undefined,$(origin KUBECONFIG)),$(NODE_KUBECONFIG),$(KUBECONFIG)),$(NODE_KUBECONFIG))
ifneq ($(wildcard $(NODE_KUBECONFIG)),)
E2E_ON_NODE := 1
e2e: export KUBECONFIG := $(NODE_KUBECONFIG)
e2e: export KUBECTL := $(if $(filter file,$(origin KUBECTL)),$(NODE_BIN_DIR)/kubectl,$(KUBECTL))
e2e: export HELM := $(if $(filter file,$(origin HELM)),$(CURDIR)/e2e/node/helm,$(HELM))
endif
endif

e2e: ## the end-to-end suite (e2e/, its own Cargo workspace) against the current kubectl context, or make node-up's cluster while it is up; make kind-up deploy (Docker) or make node-up (no Docker) first
	@$(if $(E2E_ON_NODE),echo "make e2e: testing the local cluster of make node-up (KUBECONFIG=$(NODE_KUBECONFIG), kubectl $(KUBECTL), helm $(HELM))",true)
	$(call need_tool,$(KUBECTL),install kubectl: https://kubernetes.io/docs/tasks/tools/ (and run make kind-up deploy, or make node-up))
	@ctx=$$($(KUBECTL) config current-context 2>/dev/null) || { \
	  echo "make $@: no kubectl context is set, so there is no cluster to test."; \
	  if ! command -v $(DOCKER) >/dev/null; then echo "make $@: docker is not installed here, so a local kind cluster cannot run here."; \
	  elif ! $(DOCKER) info >/dev/null 2>&1; then echo "make $@: docker's daemon does not answer here, so a local kind cluster cannot run here."; fi; \
	  command -v $(KIND) >/dev/null || echo "make $@: kind is not installed here."; \
	  echo "make $@: run make images kind-up deploy (Docker, kind, helm), or make images node-up (no Docker: a local two-node cluster from the Kubernetes binaries in TIDEPOOL_NODE_BIN, see e2e/README.md), or set KUBECONFIG to a cluster where Tidepool and e2e/manifests/azurite.yaml are deployed. Nothing was tested."; \
	  exit 1; }; \
	$(KUBECTL) get --raw=/readyz --request-timeout=15s >/dev/null 2>&1 || { \
	  echo "make $@: the cluster of kubectl context $$ctx does not answer (kubectl get --raw=/readyz failed). Nothing was tested."; \
	  exit 1; }
	$(call need_tool,$(HELM),the helm upgrade scenario runs it; install Helm 3 or 4: https://helm.sh/docs/intro/install/)
	$(CARGO) test --locked --manifest-path e2e/Cargo.toml -- --test-threads=1 --nocapture
