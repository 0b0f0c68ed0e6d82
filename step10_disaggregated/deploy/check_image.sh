#!/usr/bin/env bash
# Builds step 10's image (deploy/Dockerfile) on step 9's and serves from it, without a Docker
# engine or a registry: buildah builds the Dockerfile on localhost/llm-gateway:step9, which
# step9_router/deploy/check_image.sh built from this tree just before (run that first; .ci/run
# does), and runs the image with chroot isolation (its processes share the host's network). From
# the image it starts the router with its default command, which starts a local prefill engine
# and a local decode engine, sends one chat completion through them with every prompt handed
# over, and checks that the answer came from blocks taken in (usage.cached_tokens). Prints the
# image's size. Exits non-zero, saying why, on the first failure.
#
#   step10_disaggregated/deploy/check_image.sh     # as root, or with sudo
set -euo pipefail
cd "$(dirname "$0")/../.."

STEP9_IMAGE=localhost/llm-gateway:step9
IMAGE=localhost/llm-gateway:step10
READY_TIMEOUT_S=300
export BUILDAH_ISOLATION=chroot

log() { printf '[check_image %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() {
    log "FAILED: $*" >&2
    exit 1
}

build_image() {
    buildah inspect --type image "$STEP9_IMAGE" >/dev/null 2>&1 ||
        fail "no $STEP9_IMAGE: run step9_router/deploy/check_image.sh first (it builds it)"
    log "building $IMAGE on $STEP9_IMAGE"
    local started=$SECONDS
    buildah bud --layers --pull=never --build-arg "STEP9=$STEP9_IMAGE" \
        -f step10_disaggregated/deploy/Dockerfile -t "$IMAGE" . || fail "the image did not build"
    log "built $IMAGE in $((SECONDS - started)) s; size: $(image_size)"
}

image_size() {
    buildah images --format '{{.Size}}' "$IMAGE"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

ROUTER=""  # the process group id of the `buildah run` below
CONTAINER=""
cleanup() {
    if [ -n "$ROUTER" ]; then
        kill -TERM -- "-$ROUTER" 2>/dev/null || true
        for _ in $(seq 1 30); do
            kill -0 -- "-$ROUTER" 2>/dev/null || break
            sleep 1
        done
        kill -KILL -- "-$ROUTER" 2>/dev/null || true
    fi
    [ -z "$CONTAINER" ] || buildah rm "$CONTAINER" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_ready() {
    local port=$1 logfile=$2
    for _ in $(seq 1 "$READY_TIMEOUT_S"); do
        curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && return 0
        kill -0 -- "-$ROUTER" 2>/dev/null || { tail -n 30 "$logfile" >&2; fail "the router exited"; }
        sleep 1
    done
    tail -n 30 "$logfile" >&2
    fail "the router not ready on :$port after $READY_TIMEOUT_S s"
}

# chat PORT: one greedy chat completion; prints its text and usage.cached_tokens.
chat() {
    local body status model
    model=$(curl -sf "http://127.0.0.1:$1/v1/models" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])') ||
        fail "no model listed at :$1/v1/models"
    body=$(curl -s -w '\n%{http_code}' -H 'Content-Type: application/json' \
        -d '{"model": "'"$model"'",
             "messages": [{"role": "user", "content": "Say hello to the two engines."}],
             "max_tokens": 8, "temperature": 0}' \
        "http://127.0.0.1:$1/v1/chat/completions") || fail "no answer to a chat completion on :$1"
    status=${body##*$'\n'}
    body=${body%$'\n'*}
    [ "$status" = 200 ] || fail "the chat completion on :$1 got HTTP $status: $body"
    python3 -c 'import json, sys
answer = json.loads(sys.argv[1])
print(answer["choices"][0]["message"]["content"])
print(answer["usage"]["prompt_tokens_details"]["cached_tokens"])' "$body" ||
        fail "no choices[0].message.content or usage.prompt_tokens_details in: $body"
}

serve_from_image() {
    local work port answer cached
    work=$(mktemp -d)
    buildah rm llm-gateway-check10 >/dev/null 2>&1 || true  # left by a run that was killed
    CONTAINER=$(buildah from --pull=never --name llm-gateway-check10 "$IMAGE")
    port=$(free_port)
    log "starting the router and its two engines from the image on 127.0.0.1:$port"
    # Its default command, every prompt handed over however short (local_prefill_chars 0).
    setsid buildah run "$CONTAINER" -- env GATEWAY_HOST=127.0.0.1 GATEWAY_PORT="$port" \
        GATEWAY_LOG_FORMAT=text GATEWAY_LOCAL_PREFILL_CHARS=0 python -m step10_disaggregated \
        >"$work/router.log" 2>&1 &
    ROUTER=$!
    wait_ready "$port" "$work/router.log"
    answer=$(chat "$port")
    cached=${answer##*$'\n'}
    log "router answered: ${answer%$'\n'*} (cached_tokens: $cached, the blocks taken in)"
    [ "$cached" -gt 0 ] || fail "no blocks were handed over (cached_tokens $cached)"
    rm -rf "$work"
}

# buildah's storage needs root; a CI runner's user has sudo.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || fail "run it as root: buildah needs root here"
    log "not root: running it again with sudo"
    exec sudo -E env "PATH=$PATH" "$PWD/step10_disaggregated/deploy/check_image.sh" "$@"
fi
started=$SECONDS
command -v buildah >/dev/null || fail "buildah missing: step9_router/deploy/check_image.sh installs it"
build_image
serve_from_image
log "OK in $((SECONDS - started)) s: $IMAGE ($(image_size)) served a chat completion through" \
    "the router, its blocks handed from the prefill engine to the decode engine"
