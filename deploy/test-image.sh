#!/usr/bin/env bash
# Build both container images and check them for real (docs/deploy.md#container-images).
#
#   deploy/test-image.sh                 as root on Debian: installs docker.io and debootstrap when missing
#
# 1. Docker: uses a running daemon, or starts `dockerd --iptables=false --bridge=none` (and stops it at
#    the end); containers use the host's network and bind 127.0.0.1 only.
# 2. Base: BASE_IMAGE (default serving-base:bookworm). When that image is missing it is built from
#    Debian's packages: debootstrap --variant=minbase bookworm with python3 and python3-venv, imported
#    with docker import. Set BASE_IMAGE=python:3.11-slim where Docker Hub is reachable.
# 3. Models: ./models must hold digits-tf/1 and digits-torch/1 (trained here when missing). The full
#    image bakes both (--build-arg MODELS=...); the ONNX image is built without models and is run with
#    ./models mounted read-only at /models.
# 4. Packages: the Dockerfile installs from PyPI, and torch from PyTorch's CPU index. Where that index is
#    out of reach, TORCH_WHEELS names a folder holding the torch-*+cpu wheel, served to the build over
#    127.0.0.1 (default /opt/wheels where it holds one). A base built here trusts the CAs this host trusts
#    (HOST_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt), so a TLS proxy in front of PyPI that
#    the host trusts works in the build too (pip is pointed at that bundle with PIP_CERT).
#    NO_CACHE=1 builds without Docker's layer cache (the build times in the report are then whole builds).
# 5. deploy/image_checks.py runs each image and writes the report (REPORT, default
#    reports/image-<UTC date>.md); the script exits non-zero when a build or a check fails.
# 6. Space: Docker's store only grows. Each build whose code changed adds new layers (the full image's
#    copy of its virtualenv is about 2.3 GB), and the images it replaces stay behind untagged: CI's store
#    had grown to 64 GB, 61 GB of it such leftovers, when a build failed with "no space left on device". So the script removes this
#    Dockerfile's untagged images (label org.opencontainers.image.title=serving; nobody else's) before
#    building and again at the end, keeps the build stages' layer cache under serving-stage:* tags, and
#    stops with a clear message when Docker's disk still has less than MIN_FREE_GB free (default 6: a
#    build with no cache at all added 5.3 GB).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
BASE_IMAGE=${BASE_IMAGE:-serving-base:bookworm}
FULL_TAG=${FULL_TAG:-serving:full}
ONNX_TAG=${ONNX_TAG:-serving:onnx}
REPORT=${REPORT:-reports/image-$(date -u +%Y-%m-%d-%H%M).md}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export DOCKER_BUILDKIT=0  # the classic builder: no frontend image to fetch, builds with --network host
WORK=$(mktemp -d)
DOCKERD_PID=""
SERVER_PIDS=()
DOCKER_UP=""
LABEL=org.opencontainers.image.title=serving  # deploy/Dockerfile puts it on every stage
STAGE_REPO=${STAGE_REPO:-serving-stage}
MIN_FREE_GB=${MIN_FREE_GB:-6}

cleanup() {
  for pid in "${SERVER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -z "$DOCKER_UP" ] || log "removing untagged images left by this run: $(prune_leftovers | paste -sd ' ')"
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '== %s\n' "$*"; }

# Untagged images from deploy/Dockerfile: the images that later builds of a tag replaced, the build stages
# of runs before the stage tags existed, what a failed build left. Removing one also removes its untagged
# parent layers that nothing else uses.
# Images from before that label (2026-12-06) are found by their base instead: every untagged image built on
# the base this script makes is one of its builds.
prune_leftovers() {
  "$DOCKER" image prune --force --filter "label=$LABEL" | tail -1
  [ "$BASE_IMAGE" = "serving-base:bookworm" ] || return 0
  local base id removed=0
  base=$("$DOCKER" image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null) || return 0
  base=${base#sha256:}
  for id in $("$DOCKER" image ls --quiet --filter dangling=true); do
    if "$DOCKER" history --quiet "$id" | grep -qx "${base:0:12}"; then
      "$DOCKER" image rm "$id" >/dev/null && removed=$((removed + 1))
    fi
  done
  [ "$removed" -eq 0 ] || echo "and $removed untagged images built on $BASE_IMAGE"
}

# --- 1. docker ---------------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  scripts/system-packages.sh docker.io:dockerd debootstrap
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || { echo "no docker daemon, and starting one needs root" >&2; exit 1; }
  log "starting dockerd --iptables=false --bridge=none"
  dockerd --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
  "$DOCKER" info >/dev/null 2>&1 || { cat "$WORK/dockerd.log" >&2; exit 1; }
fi
DOCKER_UP=1

# --- space -------------------------------------------------------------------------------------------
log "removing earlier builds' untagged images: $(prune_leftovers | paste -sd ' ')"
DOCKER_ROOT=$("$DOCKER" info -f '{{.DockerRootDir}}')
if [ -d "$DOCKER_ROOT" ]; then  # a daemon on another machine (DOCKER_HOST) has its own disk
  free_gb=$(df -Pk "$DOCKER_ROOT" | awk 'NR == 2 { printf "%d", $4 / 1048576 }')
  if [ "$free_gb" -lt "$MIN_FREE_GB" ]; then
    "$DOCKER" system df >&2 || true
    echo "only ${free_gb} GB free for Docker at $DOCKER_ROOT; building both images needs ${MIN_FREE_GB} GB" \
      "(MIN_FREE_GB). Free some: docker image ls, docker image rm, docker system prune" >&2
    exit 1
  fi
  log "${free_gb} GB free for Docker at $DOCKER_ROOT"
fi

# --- 2. base image -----------------------------------------------------------------------------------
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  [ "$BASE_IMAGE" = "serving-base:bookworm" ] || { echo "base image $BASE_IMAGE is missing: pull it" >&2; exit 1; }
  log "building $BASE_IMAGE with debootstrap (a few minutes)"
  base_start=$(date +%s)
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  [ ! -f "$HOST_CA_BUNDLE" ] || cp "$HOST_CA_BUNDLE" "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$WORK/rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
  BASE_NOTE="; the base image itself (debootstrap and docker import) $(( $(date +%s) - base_start )) s"
fi

# --- 3. models ---------------------------------------------------------------------------------------
if [ ! -f models/digits-tf/1/model.onnx ] || [ ! -f models/digits-torch/1/model.onnx ]; then
  log "training digits-tf and digits-torch into ./models (about 25 s)"
  "$PY" train.py --dataset digits >"$WORK/train.log" 2>&1 || { tail -20 "$WORK/train.log" >&2; exit 1; }
fi

# --- 4. build ----------------------------------------------------------------------------------------
# serve_dir DIR: an HTTP server for DIR on 127.0.0.1; sets SERVED_URL. Its URL is a build argument, and a
# build argument's value is part of the layer cache's key: on a port of its own each run, every step after
# it missed the cache (the ONNX image took 80 s "with the cache"). So it takes WHEELS_PORT (default 47813)
# when that port is free, and another only when it is not.
serve_dir() {
  local port
  port=$("$PY" -c '
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "${WHEELS_PORT:-47813}")
  "$PY" -m http.server "$port" --bind 127.0.0.1 --directory "$1" >>"$WORK/mirrors.log" 2>&1 &
  SERVER_PIDS+=($!)
  SERVED_URL="http://127.0.0.1:$port"
}

PIP_ARGS=()
[ "$BASE_IMAGE" != "serving-base:bookworm" ] || PIP_ARGS+=(--build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
if compgen -G "$TORCH_WHEELS/torch-*+cpu-*.whl" >/dev/null; then
  serve_dir "$TORCH_WHEELS"
  PIP_ARGS+=(--build-arg PIP_EXTRA_INDEX_URL= --build-arg "PIP_FIND_LINKS=$SERVED_URL/")
  log "torch's CPU wheel from $TORCH_WHEELS, served on $SERVED_URL"
fi

build() {  # build TAG LOG ARGS...: prints the seconds it took
  local tag=$1 logfile=$2 start
  shift 2
  start=$(date +%s)
  if ! "$DOCKER" build --network host ${NO_CACHE:+--no-cache} -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
      -t "$tag" "$@" . \
      >"$logfile" 2>&1; then
    tail -40 "$logfile" >&2
    echo "building $tag failed (log above)" >&2
    return 1
  fi
  echo $(( $(date +%s) - start ))
}

keep_stage_cache() {  # keep_stage_cache STAGE ARGS...: tags a build stage so its layers stay as a cache
  "$DOCKER" build --quiet --network host -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --target "$1" -t "$STAGE_REPO:$1" "${@:2}" . >"$WORK/stage-$1.log" 2>&1 \
    || { tail -20 "$WORK/stage-$1.log" >&2; echo "tagging the $1 stage failed" >&2; return 1; }
}

log "building $ONNX_TAG (ONNX Runtime only, no models)"
onnx_seconds=$(build "$ONNX_TAG" "$WORK/build-onnx.log" --target onnx "${PIP_ARGS[@]}")
log "built $ONNX_TAG in ${onnx_seconds} s"
log "building $FULL_TAG (every backend, digits-tf and digits-torch baked)"
full_seconds=$(build "$FULL_TAG" "$WORK/build-full.log" --target full --build-arg MODELS=digits-tf,digits-torch \
  "${PIP_ARGS[@]}")
log "built $FULL_TAG in ${full_seconds} s"
# The final images copy the stages' virtualenvs, so nothing refers to the stages themselves: untagged, the
# next prune would remove them and their dependency layers with them. Tagged (from the cache: seconds),
# they stay, and a change to the code rebuilds only the layers after it.
keep_stage_cache venv-onnx "${PIP_ARGS[@]}"
keep_stage_cache venv-full "${PIP_ARGS[@]}"

# --- 5. run and check --------------------------------------------------------------------------------
"$PY" deploy/image_checks.py --base "$BASE_IMAGE" --models models \
  --image "full=$FULL_TAG:baked" --image "onnx=$ONNX_TAG:mounted" --report "$REPORT" \
  --note "Build times on this machine ($([ -n "${NO_CACHE:-}" ] && echo "no layer cache: every step ran, packages downloaded" || echo "Docker's layer cache as it was")): $ONNX_TAG ${onnx_seconds} s, $FULL_TAG ${full_seconds} s${BASE_NOTE:-}." \
  --note "Docker $("$DOCKER" version -f '{{.Server.Version}}'), storage driver $("$DOCKER" info -f '{{.Driver}}')."
