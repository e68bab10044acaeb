#!/usr/bin/env bash
# Builds the statically linked lohar that goes into the guest initramfs:
# target/x86_64-unknown-linux-gnu/release/lohar (glibc, +crt-static).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --quiet -p lohar --target x86_64-unknown-linux-gnu
out=target/x86_64-unknown-linux-gnu/release/lohar
if [[ $(ldd "$out" 2>&1 || true) == *"=>"* ]]; then
  echo "build-lohar.sh: $out is not static" >&2
  exit 1
fi
echo "$out"
