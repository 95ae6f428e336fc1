#!/usr/bin/env bash
# Every library crate packages for crates.io: `cargo package` of the whole workspace but the
# binary and the internal crates, without the verifying build (the clippy, doc and test steps
# compile the same sources; `cargo publish --workspace --dry-run` in the README does both).
# Any warning cargo prints (a manifest without description, license, ...) fails the step.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! out=$(cargo package --workspace --no-verify \
  --exclude tracktrace-server --exclude tracktrace-benches --exclude tracktrace-examples 2>&1); then
  echo "$out" >&2
  exit 1
fi
if grep -q '^warning' <<<"$out"; then
  echo "$out" >&2
  echo "package: cargo warned about a library crate's manifest" >&2
  exit 1
fi
grep -E '^ *Packag(ing|ed)' <<<"$out"
