# Shell functions step9_router/deploy/check_image.sh and step10_disaggregated/deploy/check_image.sh
# both use: logging, serving from a buildah container, waiting for readiness, one chat completion.
# Sourced, not run. The sourcing script sets IMAGE (for image_size) and CONTAINER (for serve);
# sourcing sets the traps that stop the servers and remove the container on exit.
# shellcheck shell=bash

READY_TIMEOUT_S=300
export BUILDAH_ISOLATION=chroot

log() { printf '[check_image %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() {
    log "FAILED: $*" >&2
    exit 1
}

image_size() {
    buildah images --format '{{.Size}}' "$IMAGE"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

SERVERS=()  # process group ids of the `buildah run`s serve starts
CONTAINER=""
cleanup() {
    local pgid
    for pgid in "${SERVERS[@]}"; do kill -TERM -- "-$pgid" 2>/dev/null || true; done
    for pgid in "${SERVERS[@]}"; do
        for _ in $(seq 1 30); do
            kill -0 -- "-$pgid" 2>/dev/null || break
            sleep 1
        done
        kill -KILL -- "-$pgid" 2>/dev/null || true
    done
    [ -z "$CONTAINER" ] || buildah rm "$CONTAINER" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# serve LOG CMD...: runs CMD in the image in its own process group, on the host's network.
serve() {
    local logfile=$1
    shift
    setsid buildah run "$CONTAINER" -- env GATEWAY_HOST=127.0.0.1 GATEWAY_LOG_FORMAT=text "$@" \
        >"$logfile" 2>&1 &
    SERVERS+=($!)
}

# wait_ready NAME PORT LOG: waits for the server serve started last to answer /health/ready.
wait_ready() {
    local name=$1 port=$2 logfile=$3 pgid=${SERVERS[-1]}
    for _ in $(seq 1 "$READY_TIMEOUT_S"); do
        curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && return 0
        kill -0 -- "-$pgid" 2>/dev/null || { tail -n 30 "$logfile" >&2; fail "$name exited"; }
        sleep 1
    done
    tail -n 30 "$logfile" >&2
    fail "$name not ready on :$port after $READY_TIMEOUT_S s"
}

# chat PORT PROMPT [HEADERS_FILE]: one greedy 8-token chat completion to the model the server
# lists, its response headers written to HEADERS_FILE; prints the response body (HTTP 200 only).
chat() {
    local body status model
    model=$(curl -sf "http://127.0.0.1:$1/v1/models" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])') ||
        fail "no model listed at :$1/v1/models"
    body=$(curl -s -D "${3:-/dev/null}" -w '\n%{http_code}' -H 'Content-Type: application/json' \
        -d '{"model": "'"$model"'", "messages": [{"role": "user", "content": "'"$2"'"}],
             "max_tokens": 8, "temperature": 0}' \
        "http://127.0.0.1:$1/v1/chat/completions") || fail "no answer to a chat completion on :$1"
    status=${body##*$'\n'}
    body=${body%$'\n'*}
    [ "$status" = 200 ] || fail "the chat completion on :$1 got HTTP $status: $body"
    printf '%s\n' "$body"
}

# answer_text BODY: prints a chat completion's choices[0].message.content.
answer_text() {
    python3 -c 'import json, sys
print(json.loads(sys.argv[1])["choices"][0]["message"]["content"])' \
        "$1" || fail "no choices[0].message.content in: $1"
}
