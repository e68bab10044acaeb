#!/usr/bin/env bash
# From a fresh Debian/Ubuntu machine to a sandbox you can exec in, as root:
# system packages, release build, guest image, daemon, admin user and key,
# client config, and a first sandbox `demo`. Safe to run again: it reuses
# the running daemon, the working client config and the existing sandbox.
#
#   BHATTI_DATA_DIR  data directory (default /var/lib/bhatti)
#   BHATTI_URL       where the daemon listens and the client connects
#                    (default http://127.0.0.1:8700)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

data=${BHATTI_DATA_DIR:-/var/lib/bhatti}
url=${BHATTI_URL:-http://127.0.0.1:8700}
listen=${url#http://}
listen=${listen%%/*}
bhatti=$root/target/release/bhatti
say() { printf '\n== %s\n' "$*"; }
die() { printf 'quickstart.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: the daemon creates bridges, TAPs and firewall rules"
[ -r /etc/debian_version ] || die "this script knows Debian and Ubuntu only (it uses apt-get)"

say "system packages"
packages=(
  qemu-system-x86   # the VM engine (with KVM when the host has it, else TCG)
  mmdebstrap        # the `minimal` guest rootfs
  cpio e2fsprogs zstd xz-utils lz4 gzip  # initramfs, ext4 images, kernel payloads
  iproute2 iptables # bridges, TAPs and firewall rules
  nftables          # TAP guards (anti-spoofing): an nftables bridge table
  tmux              # not needed to run; the CLI tests drive `bhatti shell` with it
  libsqlite3-dev pkg-config  # the daemon's embedded SQLite store
  ca-certificates
  build-essential   # the C toolchain cargo links with
)
missing=()
for p in "${packages[@]}"; do
  # No `| grep -q` under pipefail: grep may exit before the writer is done.
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) == *"install ok installed"* ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "all present"
fi

say "Rust toolchain"
if ! command -v cargo >/dev/null; then
  # rust-toolchain.toml pins the version; rustup fetches it on first use.
  if apt-cache show rustup >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends rustup >/dev/null
  fi
  command -v cargo >/dev/null || die "no cargo: install Rust with rustup (https://rustup.rs), then run this again"
fi
cargo --version

say "build (release bhatti, static lohar for the guest)"
cargo build --release --quiet -p bhatti
lohar=$(bash scripts/build-lohar.sh | tail -n 1)
ln -sf "$bhatti" /usr/local/bin/bhatti
echo "bhatti: $bhatti (linked from /usr/local/bin/bhatti); guest agent: $lohar"

say "guest image (kernel, initramfs, minimal rootfs) in $data"
mkdir -p "$data"
"$bhatti" image build --data-dir "$data" --lohar "$root/$lohar"

say "daemon on $url"
server_up() { [[ $("$bhatti" --url "$url" version 2>/dev/null || true) == *$'\nserver: bhatti'* ]]; }
pidfile=$data/bhatti.pid
if server_up; then
  echo "already running"
else
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "pid $(cat "$pidfile") from $pidfile runs but $url does not answer; see $data/bhatti.log"
  fi
  nohup "$bhatti" serve --data-dir "$data" --listen "$listen" >>"$data/bhatti.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 300); do
    server_up && break
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -n 20 "$data/bhatti.log" >&2; die "the daemon exited; log: $data/bhatti.log"; }
    sleep 0.1
  done
  server_up || { tail -n 20 "$data/bhatti.log" >&2; die "the daemon did not answer on $url within 30 s; log: $data/bhatti.log"; }
  echo "started (pid $(cat "$pidfile"), log $data/bhatti.log)"
fi
"$bhatti" --url "$url" version

say "admin user and client config"
if BHATTI_URL=$url "$bhatti" list >/dev/null 2>&1; then
  echo "the saved client config already works"
else
  if [[ $("$bhatti" user list --json --data-dir "$data") == *'"name": "admin"'* ]]; then
    echo "user admin exists; issuing a new key (the old one stops working)"
    key=$("$bhatti" user rotate-key admin --quiet --data-dir "$data")
  else
    key=$("$bhatti" user create --name admin --quiet --data-dir "$data")
  fi
  "$bhatti" setup --url "$url" --token "$key"
fi

say "sandbox demo"
BHATTI_URL=$url "$bhatti" create --name demo
say "bhatti exec demo -- uname -a"
BHATTI_URL=$url "$bhatti" exec demo -- uname -a

cat <<EOF

bhatti is up. Next:

  bhatti shell demo                          # a terminal in the sandbox; Ctrl+\\ detaches
  bhatti exec demo -- python3 -c 'print(6*7)'
  echo 'print("hi")' | bhatti file write demo /workspace/hi.py
  bhatti file ls demo /workspace
  bhatti exec demo -- sh -c 'setsid python3 -m http.server 8000 -d /workspace >/dev/null 2>&1 &'
  bhatti ports demo                          # what listens in the sandbox
  bhatti publish demo -p 8000                # a preview URL on the public proxy; wakes the sandbox when cold
  bhatti forward demo 8000                   # or: 127.0.0.1:8000 here -> port 8000 in the sandbox
  bhatti list
  bhatti destroy demo
  bhatti --help                              # every command; reference: docs/cli.md

The daemon logs to $data/bhatti.log. Stop it with:

  kill \$(cat $pidfile)
EOF
