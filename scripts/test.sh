#!/usr/bin/env bash
# The one test command: installs the system packages the suite needs
# (idempotent, quiet when present), then format, lint and the whole suite,
# including the QEMU-TCG VM tests. Run as root on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86   # the VM engine the VM tests use (TCG here)
  mmdebstrap        # the `minimal` guest rootfs
  cpio e2fsprogs zstd xz-utils lz4 gzip  # initramfs, ext4 images, kernel payloads
  iproute2 iptables # bridges, TAPs, namespaces and firewall rules in tests
  nftables          # TAP guards (anti-spoofing): an nftables bridge table
  iputils-ping      # ICMP checks of the firewall tests
  tmux              # drives the interactive shell in CLI tests
  pebble            # a test ACME server (and its DNS) for tests/acme.rs
  util-linux        # unshare: the ACME test's CLI gets its own /etc/hosts
  libsqlite3-dev pkg-config  # the daemon's embedded SQLite store
  ca-certificates
  python3-venv      # venvs for openapi-spec-validator and the mcp SDK (PyPI), below
  curl systemd      # the installer test: downloads bundles with curl, checks the unit with systemd-analyze
  chromium          # the browser crates/api/tests/share.rs drives (Playwright, below)
  fonts-dejavu-core # a monospace font for the browser terminal
  docker-registry skopeo umoci buildah  # OCI images: a registry in a test namespace, image tools
  # arm64: the engine for arm64 guests (TCG), and the cross-builds of the
  # static aarch64 lohar and of bhatti with Debian's own Rust (the pinned
  # rustup toolchain has no aarch64 std and cannot fetch one here)
  qemu-system-arm
  rustc-web gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  libstd-rust-web-dev:arm64 libsqlite3-dev:arm64
)
# npm checks web/vendor/ against the pinned xterm.js packages (below);
# Debian's unless a Node.js that brings its own is installed.
command -v npm >/dev/null || packages+=(npm)
# The :arm64 packages above come from Debian's arm64 archive.
if [ "$(dpkg --print-architecture)" != arm64 ] &&
   [[ $'\n'$(dpkg --print-foreign-architectures)$'\n' != *$'\narm64\n'* ]]; then
  echo "test.sh: dpkg --add-architecture arm64"
  dpkg --add-architecture arm64
  apt-get update -qq
fi
missing=()
for p in "${packages[@]}"; do
  # No `| grep -q` under pipefail: grep may exit before the writer is done.
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) == *"install ok installed"* ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the VM and network tests need root; run as root" >&2
  exit 1
fi

# rust-toolchain.toml pins 1.95.0. A machine whose stable toolchain is
# 1.95.0 but has none under that name gets a link rather than a download.
if command -v rustup >/dev/null && ! (cd / && rustup run 1.95.0 rustc --version >/dev/null 2>&1); then
  if [[ $(cd / && rustup run stable rustc --version 2>/dev/null || true) == "rustc 1.95.0"* ]]; then
    rustup toolchain link 1.95.0 "$(cd / && rustup run stable rustc --print sysroot)"
  fi
fi

# Python tools some tests drive, each from PyPI at a pinned version in a
# venv kept beside the test images (one per version, reused by later runs).
# Those tests fail without them. py_tool NAME VERSION CHECK: the venv's path.
py_tool() {
  local venv=/var/cache/bhatti-test/venv-$1-$2
  if ! "$venv/bin/python" -c "$3" >/dev/null 2>&1; then
    echo "test.sh: installing $1 $2 into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || return 1
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$1==$2" >&2 || return 1
  fi
  echo "$venv"
}
# crates/api/tests/openapi.rs validates the generated OpenAPI document.
venv=$(py_tool openapi-spec-validator 0.9.0 "import openapi_spec_validator")
export BHATTI_OPENAPI_VALIDATOR="$venv/bin/openapi-spec-validator"
# crates/bhatti/tests/mcp.rs drives the MCP server with the official SDK.
venv=$(py_tool mcp 2.3.0 "import mcp")
export BHATTI_MCP_PYTHON="$venv/bin/python"
# crates/api/tests/e2b.rs drives the daemon's E2B API with the stock SDK.
venv=$(py_tool e2b 2.63.0 "import e2b")
export BHATTI_E2B_PYTHON="$venv/bin/python"
# crates/api/tests/observe.rs parses /metrics with Prometheus' own parser.
venv=$(py_tool prometheus-client 0.21.1 "import prometheus_client.parser")
export BHATTI_PROMETHEUS_PYTHON="$venv/bin/python"
# crates/api/tests/share.rs drives Chromium (the system one: Playwright
# downloads no browser here) through the browser terminal.
venv=$(py_tool playwright 1.65.2 "import playwright.sync_api")
export BHATTI_PLAYWRIGHT_PYTHON="$venv/bin/python"

# The browser terminal's xterm.js is built into the daemon from web/vendor/
# (checked in, so `cargo build` needs no npm); it must be what npm installs
# from web/package-lock.json.
echo "== web/vendor against npm"
(cd web && npm ci --no-audit --no-fund --silent && ./vendor.sh --check)

# One build from a clean tree: incremental state would only double the disk
# the target directory takes.
export CARGO_INCREMENTAL=0

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== build (host binaries, and the static lohars for the guest initramfs: amd64, arm64)"
cargo build --workspace --quiet
export BHATTI_LOHAR_STATIC; BHATTI_LOHAR_STATIC=$(bash scripts/build-lohar.sh)
export BHATTI_LOHAR_STATIC_ARM64; BHATTI_LOHAR_STATIC_ARM64=$(bash scripts/build-lohar.sh arm64)
echo "== cross-build check: bhatti for aarch64-unknown-linux-gnu (Debian's rustc, libsqlite3-dev:arm64)"
started=$SECONDS
RUSTC=/usr/bin/rustc \
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
PKG_CONFIG_ALLOW_CROSS=1 \
PKG_CONFIG_LIBDIR=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig \
  cargo build --quiet -p bhatti --target aarch64-unknown-linux-gnu
echo "bhatti for aarch64 built in $((SECONDS - started)) s"
echo "== test images (built before the suites, outside every test namespace)"
cargo run --quiet -p bhatti-testkit --bin prepare-test-images -- tiny minimal browser docker arm64:tiny
echo "== cargo test"
# --no-fail-fast: one broken suite must not hide the others.
# BHATTI_TESTS_MUST_RUN: a VM or namespace test that cannot run here fails
# rather than printing SKIP (testkit::cannot_run); only the Firecracker test,
# whose binary a machine may lack, still prints SKIP.
# The runner ends a test binary that hangs (scripts/test-runner.sh).
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/test-runner.sh" \
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/test-runner.sh" \
BHATTI_TESTS_MUST_RUN=1 cargo test --workspace --no-fail-fast 2>&1
