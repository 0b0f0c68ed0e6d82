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
# shellcheck source=step9_router/deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../step9_router/deploy/lib.sh"
cd "$(dirname "$0")/../.."

STEP9_IMAGE=localhost/llm-gateway:step9
IMAGE=localhost/llm-gateway:step10

build_image() {
    buildah inspect --type image "$STEP9_IMAGE" >/dev/null 2>&1 ||
        fail "no $STEP9_IMAGE: run step9_router/deploy/check_image.sh first (it builds it)"
    log "building $IMAGE on $STEP9_IMAGE"
    local started=$SECONDS
    buildah bud --layers --pull=never --build-arg "STEP9=$STEP9_IMAGE" \
        -f step10_disaggregated/deploy/Dockerfile -t "$IMAGE" . || fail "the image did not build"
    log "built $IMAGE in $((SECONDS - started)) s; size: $(image_size)"
}

# cached_tokens BODY: prints a chat completion's usage.prompt_tokens_details.cached_tokens.
cached_tokens() {
    python3 -c 'import json, sys
print(json.loads(sys.argv[1])["usage"]["prompt_tokens_details"]["cached_tokens"])' "$1" ||
        fail "no usage.prompt_tokens_details.cached_tokens in: $1"
}

serve_from_image() {
    local work port body answer cached
    work=$(mktemp -d)
    buildah rm llm-gateway-check10 >/dev/null 2>&1 || true  # left by a run that was killed
    CONTAINER=$(buildah from --pull=never --name llm-gateway-check10 "$IMAGE")
    port=$(free_port)
    log "starting the router and its two engines from the image on 127.0.0.1:$port"
    # Its default command, every prompt handed over however short (local_prefill_chars 0).
    serve "$work/router.log" GATEWAY_PORT="$port" GATEWAY_LOCAL_PREFILL_CHARS=0 \
        python -m step10_disaggregated
    wait_ready "the router" "$port" "$work/router.log"
    body=$(chat "$port" "Say hello to the two engines.")
    answer=$(answer_text "$body")
    cached=$(cached_tokens "$body")
    log "router answered: $answer (cached_tokens: $cached, the blocks taken in)"
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
