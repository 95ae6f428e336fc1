#!/usr/bin/env bash
# examples/embed: an application outside the workspace (its own [workspace] and Cargo.lock)
# that embeds the library crates, linted and run on sled and on PostgreSQL (a fresh schema,
# dropped afterwards). It checks its own results and exits non-zero when one is off.
set -euo pipefail
cd "$(dirname "$0")/.."
manifest=examples/embed/Cargo.toml
# The workspace's target directory: the dependencies it shares with the workspace are reused.
export CARGO_TARGET_DIR="$PWD/target"
url=${TRACKTRACE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
dir=$(mktemp -d)
schema="embed_$(date +%s)_$$"
cleanup() {
  rm -rf "$dir"
  psql -q "$url" -c "DROP SCHEMA IF EXISTS \"$schema\" CASCADE" >/dev/null 2>&1 || true
}
trap cleanup EXIT

cargo fmt --manifest-path "$manifest" -- --check
cargo clippy --locked --manifest-path "$manifest" --all-targets -- -D warnings
cargo run --locked --quiet --manifest-path "$manifest" -- sled "$dir/events"
cargo run --locked --quiet --manifest-path "$manifest" -- postgres "$url" "$schema"
