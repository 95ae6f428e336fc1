#!/usr/bin/env bash
# Architecture invariants the build can check (ARCHITECTURE.md, "Architecture invariants"):
# - which crates may depend on what (`cargo tree`, normal dependencies only);
# - no module imports a module that imports it back (.ci/module_cycles.py).
set -euo pipefail
cd "$(dirname "$0")/.."

# forbid PACKAGE "CARGO TREE FLAGS" CRATE...: fail if PACKAGE depends on any CRATE.
forbid() {
  local pkg=$1 flags=$2; shift 2
  local pattern found
  pattern="^($(IFS='|'; echo "$*"))$"
  found=$(cargo tree -p "$pkg" -e normal --prefix none $flags 2>/dev/null \
    | awk '{print $1}' | sort -u | grep -E "$pattern" || true)
  if [ -n "$found" ]; then
    echo "layering: $pkg ($flags) must not depend on: $(echo $found)" >&2
    exit 1
  fi
  echo "layering: $pkg ${flags:-(default features)}: none of $*"
}

# The kernel knows no storage engine and no transport.
forbid tracktrace-core "--all-features" sled sqlx axum hyper http tracktrace-store-sled tracktrace-store-postgres
# The conformance suite is a dev-dependency: no library or binary links it or proptest.
for pkg in tracktrace-core tracktrace-store-sled tracktrace-store-postgres tracktrace-app tracktrace-http tracktrace-server; do
  forbid "$pkg" "--all-features" tracktrace-conformance proptest
done
# The suite is backend-neutral.
forbid tracktrace-conformance "--all-features" sled sqlx axum tracktrace-store-sled tracktrace-store-postgres
# The application knows no transport (its optional InfluxDB writer speaks HTTP as a client,
# feature `influxdb`) and no backend.
forbid tracktrace-app "" axum http hyper jsonwebtoken utoipa sled sqlx tracktrace-store-sled tracktrace-store-postgres tracktrace-http
forbid tracktrace-app "--features nats,openapi" axum http hyper jsonwebtoken sled sqlx tracktrace-store-sled tracktrace-store-postgres tracktrace-http
# The HTTP adapter knows no backend.
forbid tracktrace-http "--all-features" sled sqlx tracktrace-store-sled tracktrace-store-postgres

python3 .ci/module_cycles.py --self-test
python3 .ci/module_cycles.py
