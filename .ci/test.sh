#!/usr/bin/env bash
# The project's test command (README "Run the tests"): every unit, integration, example and
# bench target (benches run once in criterion's test mode), then the doc-tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets --all-features
cargo test --workspace --doc --all-features
