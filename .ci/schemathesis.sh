#!/usr/bin/env bash
# API fuzzing: schemathesis generates requests from the server's own OpenAPI document
# (GET /openapi.json) and fails on any 5xx. Two passes against a real server on the embedded
# store: a tenant token (captures, traces, analytics) and a system-tenant admin token
# (tenant administration). The run is reproducible (fixed seed, bounded examples); the server's
# log must not hold a single "server error answered" line either. `GET /api/v1/subscribe` is
# left out: a valid request opens an event stream that lasts as long as its token, so every
# generated one would wait out the client's timeout (its limits and endings are tested in
# crates/http-adapter/tests/limits.rs).
#
# Usage: bash .ci/schemathesis.sh [MAX_EXAMPLES]   (needs target/debug/tracktrace-server)
set -euo pipefail
cd "$(dirname "$0")/.."
max_examples=${1:-60}
bin=target/debug/tracktrace-server
[ -x "$bin" ] || cargo build -q -p tracktrace-server --all-features
if ! command -v st >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check schemathesis
    hash -r
fi

dir=$(mktemp -d)
# A short minPosition wait: generated positions beyond the head wait it out before their 400.
"$bin" serve --listen 127.0.0.1:0 --data-dir "$dir/data" --read-your-writes-ms 100 >"$dir/out" 2>"$dir/log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
    grep -q "listening on" "$dir/out" 2>/dev/null && break
    sleep 0.1
done
addr=$(sed -n 's|.*listening on http://||p' "$dir/out" | head -1)
[ -n "$addr" ] || { cat "$dir/log"; echo "schemathesis: the server did not start" >&2; exit 1; }
scopes=events:write,trace:read,metrics:read,admin
tenant=$("$bin" --data-dir "$dir/data" token --tenant acme --scopes "$scopes" --server "$addr" 2>/dev/null)
system=$("$bin" --data-dir "$dir/data" token --tenant _system --scopes "$scopes" --server "$addr" 2>/dev/null)

status=0
for token in "$tenant" "$system"; do
    st run "http://$addr/openapi.json" \
        -H "Authorization: Bearer $token" \
        --checks not_a_server_error \
        --max-examples "$max_examples" --seed 20261203 --workers 2 \
        --warnings off --exclude-path /api/v1/subscribe || status=1
done
if grep -q "server error answered" "$dir/log"; then
    echo "schemathesis: the server answered 5xx errors:" >&2
    grep "server error answered" "$dir/log" | head -20 >&2
    status=1
fi
exit $status
