#!/usr/bin/env bash
# Builds the statically linked lohar that goes into the guest initramfs
# (glibc, +crt-static) and prints its path.
#
#   scripts/build-lohar.sh          amd64: <target>/x86_64-unknown-linux-gnu/release/lohar
#   scripts/build-lohar.sh arm64    arm64: <target>/aarch64-unknown-linux-gnu/release/lohar
#
# arm64 is cross-built on an x86_64 host with Debian's own Rust (rustc-web,
# with the multiarch std libstd-rust-web-dev:arm64) and gcc-aarch64-linux-gnu
# as the linker: the pinned rustup toolchain has no aarch64 std here and
# cannot fetch one. scripts/test.sh installs those packages.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
arch=${1:-amd64}
case "$arch" in
  amd64|x86_64)
    RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --quiet -p lohar --target x86_64-unknown-linux-gnu
    out=$target_dir/x86_64-unknown-linux-gnu/release/lohar
    if [[ $(ldd "$out" 2>&1 || true) == *"=>"* ]]; then
      echo "build-lohar.sh: $out is not static" >&2
      exit 1
    fi
    ;;
  arm64|aarch64)
    rustc=${BHATTI_CROSS_RUSTC:-/usr/bin/rustc}
    if [ "$(uname -m)" = aarch64 ]; then rustc=${BHATTI_CROSS_RUSTC:-rustc}; fi
    RUSTC=$rustc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-aarch64-linux-gnu-gcc} \
    RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --quiet -p lohar --target aarch64-unknown-linux-gnu
    out=$target_dir/aarch64-unknown-linux-gnu/release/lohar
    # A static executable has no program interpreter.
    if [[ $(LC_ALL=C readelf -lW "$out") == *"Requesting program interpreter"* ]]; then
      echo "build-lohar.sh: $out is not static" >&2
      exit 1
    fi
    if [[ $(LC_ALL=C readelf -hW "$out") != *"AArch64"* ]]; then
      echo "build-lohar.sh: $out is not an AArch64 executable" >&2
      exit 1
    fi
    ;;
  *)
    echo "build-lohar.sh: unknown architecture '$arch' (amd64 or arm64)" >&2
    exit 2
    ;;
esac
echo "$out"
