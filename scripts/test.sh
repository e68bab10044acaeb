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
  libsqlite3-dev pkg-config  # the daemon's embedded SQLite store
  ca-certificates
  python3-venv      # venvs for openapi-spec-validator and the mcp SDK (PyPI), below
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
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
  if (cd / && rustup run stable rustc --version 2>/dev/null | grep -q '^rustc 1\.95\.0'); then
    rustup toolchain link 1.95.0 "$(cd / && rustup run stable rustc --print sysroot)"
  fi
fi

# The OpenAPI document test (crates/api/tests/openapi.rs) runs this
# validator and fails without it. A venv kept beside the test images, one
# per pinned version, so a later run reuses it.
openapi_validator_version=0.9.0
venv=/var/cache/bhatti-test/venv-openapi-spec-validator-$openapi_validator_version
if ! "$venv/bin/openapi-spec-validator" --version >/dev/null 2>&1; then
  echo "test.sh: installing openapi-spec-validator $openapi_validator_version into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "openapi-spec-validator==$openapi_validator_version"
fi
export BHATTI_OPENAPI_VALIDATOR="$venv/bin/openapi-spec-validator"

# The MCP test (crates/bhatti/tests/mcp.rs) drives bhatti's MCP server with
# the official `mcp` Python SDK, over stdio and HTTP; it fails without it.
mcp_sdk_version=2.3.0
venv=/var/cache/bhatti-test/venv-mcp-$mcp_sdk_version
if ! "$venv/bin/python" -c "import mcp" >/dev/null 2>&1; then
  echo "test.sh: installing the mcp Python SDK $mcp_sdk_version into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "mcp==$mcp_sdk_version"
fi
export BHATTI_MCP_PYTHON="$venv/bin/python"

# The observability test (crates/api/tests/observe.rs) parses `GET /metrics`
# with the Prometheus project's own text parser (`prometheus_client`, PyPI);
# it fails without it.
prometheus_client_version=0.21.1
venv=/var/cache/bhatti-test/venv-prometheus-client-$prometheus_client_version
if ! "$venv/bin/python" -c "import prometheus_client.parser" >/dev/null 2>&1; then
  echo "test.sh: installing prometheus-client $prometheus_client_version into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "prometheus-client==$prometheus_client_version"
fi
export BHATTI_PROMETHEUS_PYTHON="$venv/bin/python"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== build (host binaries, and the static lohar for the guest initramfs)"
cargo build --workspace --quiet
bash scripts/build-lohar.sh
echo "== test images (built before the suites, outside every test namespace)"
cargo run --quiet -p bhatti-testkit --bin prepare-test-images -- tiny minimal
echo "== cargo test"
# --no-fail-fast: one broken suite must not hide the others.
# BHATTI_TESTS_MUST_RUN: a VM or namespace test that cannot run here fails
# rather than printing SKIP (testkit::cannot_run); only the Firecracker test,
# whose binary a machine may lack, still prints SKIP.
BHATTI_TESTS_MUST_RUN=1 cargo test --workspace --no-fail-fast 2>&1
