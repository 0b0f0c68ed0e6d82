#!/usr/bin/env bash
# Builds step 9's image (deploy/Dockerfile) and serves from it, without a Docker engine or a
# registry: buildah builds the Dockerfile and runs the image (chroot isolation, so the
# containers share the host's network and answer on its loopback), on a Debian bookworm base
# built here with debootstrap. From the built image it starts a step 8 engine, sends it one chat
# completion, starts the router in front of it and sends one through that; prints the image's
# size. Exits non-zero, saying why, on the first failure.
#
#   step9_router/deploy/check_image.sh     # as root, or with sudo (it installs buildah and
#                                          # debootstrap with apt-get where they are missing)
#
# Reruns reuse the base's root filesystem (a tarball under GATEWAY_CACHE_DIR/images) and
# buildah's layer cache. This machine's pip settings (indexes, wheel folders, constraints, CA
# bundle) reach the build as the Dockerfile's PIP_* arguments, with the local folders they name
# mounted read-only: none of them lands in the image's files or environment (its history lists
# them, as it lists every build argument). DEBIAN_MIRROR picks debootstrap's mirror.
set -euo pipefail
# shellcheck source=step9_router/deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/../.."

CACHE=${GATEWAY_CACHE_DIR:-$HOME/.cache/llm-gateway}/images
ROOTFS=$CACHE/bookworm-rootfs.tar
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/llm-gateway-base:bookworm
IMAGE=localhost/llm-gateway:step9

ensure_tools() {
    local missing=()
    for tool in buildah debootstrap curl; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    # debootstrap checks bookworm's signatures with it (an Ubuntu machine may not have it).
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || fail "${missing[*]} missing; install them"
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Debian bookworm's python3 (3.11) with its venv module and C headers, as python:3.11-slim has,
# kept as a tarball (readable by a CI cache that runs as another user, unlike the tree).
ensure_rootfs() {
    if [ -f "$ROOTFS" ]; then
        log "base root filesystem: cached at $ROOTFS"
        return 0
    fi
    log "base root filesystem: debootstrap bookworm from $MIRROR (about a minute)"
    local tree=$CACHE/bookworm-rootfs.partial
    rm -rf "$tree"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
        bookworm "$tree" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
        fail "debootstrap failed; its log: $CACHE/debootstrap.log"
    rm -rf "$tree/var/cache/apt/archives/"*.deb "$tree/var/lib/apt/lists/"*
    tar -C "$tree" -cf "$ROOTFS.partial" .
    chmod 644 "$ROOTFS.partial"
    mv "$ROOTFS.partial" "$ROOTFS"
    rm -rf "$tree"
    buildah rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true  # made from the previous root filesystem
}

ensure_base_image() {
    if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image: $BASE_IMAGE (already in buildah's storage)"
        return 0
    fi
    log "base image: importing the root filesystem as $BASE_IMAGE"
    local ctr
    ctr=$(buildah from --pull=never scratch)
    buildah add "$ctr" "$ROOTFS" / >/dev/null
    buildah config --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
}

# The host pip's value for a setting: its PIP_* variable, else the last of `pip config list`.
pip_setting() {
    local name=$1 var
    var=PIP_$(echo "$name" | tr 'a-z-' 'A-Z_')
    if [ -n "${!var:-}" ]; then
        echo "${!var}"
        return 0
    fi
    python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.$name='\(.*\)'$/\1/p" |
        tail -n 1
}

# Fills PIP_ARGS: a --build-arg for each pip setting the host has, and a read-only --volume for
# each local path one names (a file:// index is mounted from its parent, where its files lie).
collect_pip_args() {
    PIP_ARGS=()
    local name value item path
    local -A mounted=()
    for name in index-url extra-index-url find-links constraint cert; do
        value=$(pip_setting "$name")
        [ -n "$value" ] || continue
        PIP_ARGS+=(--build-arg "PIP_$(echo "$name" | tr 'a-z-' 'A-Z_')=$value")
        for item in $value; do
            case "$item" in
                file://*) path=$(dirname "${item#file://}") ;;
                /*) path=$item ;;
                *) continue ;;
            esac
            [ -e "$path" ] && [ -z "${mounted[$path]:-}" ] || continue
            mounted[$path]=1
            PIP_ARGS+=(--volume "$path:$path:ro")
        done
    done
}

build_image() {
    collect_pip_args
    # torch's index: this machine's pip index (PyPI by default), where its settings (a wheel
    # folder, say) find torch==2.13.0+cpu; TORCH_INDEX_URL overrides it, as the Dockerfile's
    # default, PyTorch's CPU index, would.
    local torch_index=${TORCH_INDEX_URL:-$(pip_setting index-url)}
    log "building $IMAGE (a few minutes when nothing is cached: torch, the model, the kernels)"
    local started=$SECONDS
    buildah bud --layers --pull=never --build-arg "BASE=$BASE_IMAGE" \
        --build-arg "TORCH_INDEX_URL=${torch_index:-https://pypi.org/simple}" "${PIP_ARGS[@]}" \
        -f step9_router/deploy/Dockerfile -t "$IMAGE" . || fail "the image did not build"
    log "built $IMAGE in $((SECONDS - started)) s; size: $(image_size)"
}

serve_from_image() {
    local work engine_port router_port body direct routed upstream
    work=$(mktemp -d)
    buildah rm llm-gateway-check >/dev/null 2>&1 || true  # left by a run that was killed
    CONTAINER=$(buildah from --pull=never --name llm-gateway-check "$IMAGE")
    engine_port=$(free_port)
    log "starting a step 8 engine from the image on 127.0.0.1:$engine_port"
    serve "$work/engine.log" GATEWAY_PORT="$engine_port" python -m step8_speculative
    wait_ready "the engine" "$engine_port" "$work/engine.log"
    body=$(chat "$engine_port" "Say hello." "$work/engine.headers")
    direct=$(answer_text "$body")
    [ -n "$direct" ] || fail "the engine answered with no text"
    log "engine answered: $direct ($(grep -o -m1 'backends: .*' "$work/engine.log" || true))"

    router_port=$(free_port)
    log "starting the router from the image on 127.0.0.1:$router_port"
    serve "$work/router.log" GATEWAY_PORT="$router_port" \
        GATEWAY_UPSTREAMS="http://127.0.0.1:$engine_port" python -m step9_router
    wait_ready "the router" "$router_port" "$work/router.log"
    body=$(chat "$router_port" "Say hello." "$work/router.headers")
    routed=$(answer_text "$body")
    upstream=$(sed -n 's/^x-upstream: *\([^[:space:]]*\).*/\1/Ip' "$work/router.headers")
    log "router answered: $routed (X-Upstream: ${upstream:-none})"
    [ "$upstream" = "127.0.0.1:$engine_port" ] ||
        fail "X-Upstream is '${upstream}', expected 127.0.0.1:$engine_port"
    [ "$routed" = "$direct" ] || fail "the router's greedy answer differs from the engine's"
    rm -rf "$work"
}

# buildah's storage and debootstrap need root; a CI runner's user has sudo.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || fail "run it as root: buildah and debootstrap need root here"
    log "not root: running it again with sudo"
    exec sudo -E env "PATH=$PATH" "$PWD/step9_router/deploy/check_image.sh" "$@"
fi
started=$SECONDS
ensure_tools
ensure_rootfs
ensure_base_image
build_image
serve_from_image
log "OK in $((SECONDS - started)) s: $IMAGE ($(image_size)) served a chat completion" \
    "from an engine and through the router"
