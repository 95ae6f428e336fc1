#!/usr/bin/env bash
# The workspace's `rust-version` (Cargo.toml) is a toolchain CI checks with, not a guess:
# - the default rustc must not be older than it;
# - when rustup has that exact toolchain (e.g. `1.95.0` for `rust-version = "1.95"`), the
#   workspace is checked with it. While it is the same rustc as the default toolchain, the
#   dependencies' artifacts are shared and only the workspace's own crates are checked again.
# A machine without that toolchain (none can be downloaded here) says so loudly instead of
# claiming a check it did not run.
set -euo pipefail
cd "$(dirname "$0")/.."

msrv=$(sed -n 's/^rust-version = "\([0-9.]*\)"$/\1/p' Cargo.toml)
[ -n "$msrv" ] || { echo "msrv: no rust-version in Cargo.toml" >&2; exit 1; }
case "$msrv" in
  *.*.*) toolchain=$msrv ;;
  *) toolchain=$msrv.0 ;;
esac
have=$(rustc --version | awk '{print $2}')
have=${have%%-*}

if [ "$(printf '%s\n%s\n' "$toolchain" "$have" | sort -V | head -n1)" != "$toolchain" ]; then
  echo "msrv: the default rustc $have is older than rust-version $msrv" >&2
  exit 1
fi

if rustup toolchain list 2>/dev/null | grep -q "^$toolchain-"; then
  echo "msrv: cargo +$toolchain check --workspace --all-targets (default rustc: $have)"
  cargo "+$toolchain" check --workspace --all-targets
else
  echo "msrv: WARNING: toolchain $toolchain is not installed; rust-version $msrv is NOT" \
    "checked on this machine (only the default rustc $have, by the steps above)"
fi
