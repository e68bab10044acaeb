#!/usr/bin/env bash
# Installs bhatti from a release bundle (scripts/release.sh); docs/install.md.
#
#   install.sh [SOURCE] [options]          install, or upgrade in place
#   install.sh start|stop|restart|status   the daemon of a server install
#
# SOURCE is an http(s) URL or a path of bhatti-<version>-linux-<arch>.tar.gz
# (its checksum is read from SOURCE.sha256 unless --sha256 is given), or an
# unpacked bundle directory; run from inside an unpacked bundle, that one.
#
#   --server              a full server: daemon, config, data dir, VMM user,
#                         service (default: the CLI only)
#   --sha256 HEX          the bundle's checksum (instead of SOURCE.sha256)
#   --listen ADDR         API address for a new config (127.0.0.1:8700)
#   --public-listen ADDR  public proxy for a new config (127.0.0.1:8081; none)
#   --data-dir DIR        data directory for a new config (/var/lib/bhatti)
#   --engine E            auto | firecracker | qemu-kvm | qemu-tcg (auto)
#   --vmm-user NAME       system user the VMMs run as (bhatti-vmm)
#   --cgroup-parent NAME  cgroup holding the VMMs' cgroups (bhatti)
#   --admin-user NAME     create this user (an admin) and print its API key
#   --admin-key-file F    also write that key to F (mode 0600)
#   --replace-images      replace changed tier images although sandboxes
#                         exist (they are built on the old ones)
#   --allow-downgrade     install a bundle older than the installed one
#   --no-start            install but do not start the daemon
#   --root DIR            install under DIR instead of / (tests; the daemon
#                         is then run by this script, never by systemd);
#                         also $BHATTI_INSTALL_ROOT
#   --yes                 do not ask (there is one question: go ahead?)
#
# The settings for a new config apply only when /etc/bhatti/config.toml does
# not exist yet: an existing one is kept as it is.
set -euo pipefail
umask 022

die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '== %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }

action=install
src=""
server=0
sha=""
listen=127.0.0.1:8700
public=127.0.0.1:8081
data=""
engine=auto
vmm_user=bhatti-vmm
cgparent=bhatti
admin=""
admin_key_file=""
replace_images=0
downgrade=0
start=1
yes=0
root=${BHATTI_INSTALL_ROOT:-}
case ${1:-} in start|stop|restart|status) action=$1; shift ;; esac
while (($#)); do
  case $1 in
    --server) server=1; shift ;;
    --sha256) sha=${2:?--sha256 needs a value}; shift 2 ;;
    --listen) listen=${2:?--listen needs an address}; shift 2 ;;
    --public-listen) public=${2:?--public-listen needs an address}; shift 2 ;;
    --data-dir) data=${2:?--data-dir needs a directory}; shift 2 ;;
    --engine) engine=${2:?--engine needs a value}; shift 2 ;;
    --vmm-user) vmm_user=${2:?--vmm-user needs a name}; shift 2 ;;
    --cgroup-parent) cgparent=${2:?--cgroup-parent needs a name}; shift 2 ;;
    --admin-user) admin=${2:?--admin-user needs a name}; shift 2 ;;
    --admin-key-file) admin_key_file=${2:?--admin-key-file needs a path}; shift 2 ;;
    --replace-images) replace_images=1; shift ;;
    --allow-downgrade) downgrade=1; shift ;;
    --no-start) start=0; shift ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --yes|-y) yes=1; shift ;;
    -h|--help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [ -z "$src" ] || die "two sources: '$src' and '$1'"; src=$1; shift ;;
  esac
done

# --- the system ---------------------------------------------------------
[ "$(uname -s)" = Linux ] || die "bhatti runs on Linux only (this is $(uname -s))"
case $(uname -m) in
  x86_64) arch=x86_64; qemu="qemu-system-x86_64" ;;
  aarch64|arm64) arch=aarch64; qemu="qemu-system-aarch64" ;;
  *) die "unsupported architecture $(uname -m): bhatti has bundles for x86_64 and aarch64" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root (sudo): the installer writes /usr/local, /etc and /var/lib"
if [ -n "$root" ]; then
  case $root in /*) ;; *) die "--root must be an absolute path" ;; esac
  root=${root%/}
  [ "$root" != "" ] || die "--root / is the default; leave it out"
fi

etc=$root/etc/bhatti
conf=$etc/config.toml
lib=$root/usr/local/lib/bhatti
bindir=$root/usr/local/bin
unit=$root/etc/systemd/system/bhatti.service
logdir=$root/var/log/bhatti
log=$logdir/bhatti.log
rundir=$root/run/bhatti
pidfile=$rundir/bhatti.pid
state=$lib/install-state

# systemd runs the daemon only for a real install (not under --root) on a
# host booted with it.
systemd=0
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then systemd=1; fi

state_get() { [ -f "$state" ] && sed -n "s/^$1=//p" "$state" | tail -n 1 || true; }

# --- the daemon -----------------------------------------------------------
# The pid in the pid file is ours only if it runs `bhatti serve` with our config.
daemon_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -F -- " serve --config $conf" >/dev/null || return 1
  echo "$pid"
}

listen_of() { "$lib/bhatti" config check --config "$conf" 2>/dev/null | sed -n 's/^listen = "\(.*\)"/\1/p' | head -n 1; }

probe_url() {
  local l host port
  l=$(listen_of)
  port=${l##*:}
  host=${l%:*}
  case $host in 0.0.0.0|"[::]"|"") host=127.0.0.1 ;; esac
  echo "http://$host:$port"
}

answers() { "$lib/bhatti" --url "$1" version 2>/dev/null | grep '^server: bhatti' >/dev/null; }

stop_daemon() {
  if [ "$(state_get service)" = systemd ]; then
    if systemctl is-active --quiet bhatti.service; then
      say "stopping bhatti.service (sandboxes go cold)"
      systemctl stop bhatti.service
    fi
    return 0
  fi
  local pid
  pid=$(daemon_pid) || { rm -f "$pidfile"; return 0; }
  say "stopping the daemon (pid $pid; sandboxes go cold, up to about a minute)"
  kill -TERM "$pid"
  for _ in $(seq 1 1500); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    warn "the daemon did not stop within 150 s; killing it (its VMMs are adopted at the next start)"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$pidfile"
}

start_daemon() {
  if [ "$(state_get service)" = systemd ]; then
    systemctl daemon-reload
    systemctl enable --quiet bhatti.service
    systemctl restart bhatti.service
  else
    if pid=$(daemon_pid); then echo "already running (pid $pid)"; return 0; fi
    mkdir -p "$logdir" "$rundir"
    chmod 0750 "$logdir"
    # setsid: its own session, so it outlives this script and the terminal.
    (cd / && RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 exec setsid "$lib/bhatti" serve --config "$conf" \
      >>"$log" 2>&1 </dev/null) &
    echo $! >"$pidfile"
  fi
  local url
  url=$(probe_url)
  for _ in $(seq 1 600); do
    answers "$url" && break
    if [ "$(state_get service)" != systemd ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      tail -n 20 "$log" >&2 || true
      die "the daemon exited at start; log: $log"
    fi
    sleep 0.1
  done
  if ! answers "$url"; then
    if [ "$(state_get service)" = systemd ]; then
      die "bhatti.service does not answer on $url after 60 s; see journalctl -u bhatti"
    fi
    die "the daemon does not answer on $url after 60 s; log: $log"
  fi
  echo "the daemon answers on $url"
}

if [ "$action" != install ]; then
  [ "$(state_get mode)" = server ] || die "no server install under ${root:-/} (no $state with mode=server)"
  case $action in
    stop) stop_daemon ;;
    start) start_daemon ;;
    restart) stop_daemon; start_daemon ;;
    status)
      if [ "$(state_get service)" = systemd ]; then exec systemctl status bhatti.service; fi
      if pid=$(daemon_pid); then echo "running (pid $pid), log $log"; else echo "not running"; exit 3; fi ;;
  esac
  exit 0
fi

# --- the bundle -----------------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "$src" ]; then
  [ -f "$here/manifest.json" ] && [ -f "$here/SHA256SUMS" ] ||
    die "no bundle: pass its URL or file (bhatti-<version>-linux-<arch>.tar.gz)"
  src=$here
fi
case $src in
  http://*|https://*)
    command -v curl >/dev/null || die "curl is needed to download $src"
    say "downloading $src"
    curl -fsSL --retry 3 -o "$work/bundle.tar.gz" "$src" || die "cannot download $src"
    if [ -z "$sha" ]; then
      sha=$(curl -fsSL "$src.sha256" | cut -d' ' -f1) ||
        die "cannot download $src.sha256; pass the checksum with --sha256 HEX"
    fi
    tarball=$work/bundle.tar.gz ;;
  *)
    if [ -d "$src" ]; then
      bundle=$(cd "$src" && pwd)
    else
      [ -f "$src" ] || die "$src: no such file or directory"
      if [ -z "$sha" ]; then
        [ -f "$src.sha256" ] || die "no checksum: $src.sha256 does not exist; pass --sha256 HEX"
        sha=$(cut -d' ' -f1 "$src.sha256")
      fi
      tarball=$src
    fi ;;
esac
if [ -z "${bundle:-}" ]; then
  [[ $sha =~ ^[0-9a-f]{64}$ ]] || die "checksum '$sha' is not a sha256 (64 hex digits)"
  got=$(sha256sum "$tarball" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || die "checksum mismatch: the bundle's sha256 is $got, expected $sha"
  echo "checksum OK"
  tar -xzf "$tarball" -C "$work" || die "cannot unpack the bundle"
  bundle=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'bhatti-*' | head -n 1)
  [ -n "$bundle" ] || die "the tarball holds no bhatti-* directory"
fi
[ -f "$bundle/manifest.json" ] && [ -f "$bundle/SHA256SUMS" ] || die "$bundle is not a bhatti bundle (no manifest.json)"
(cd "$bundle" && sha256sum --quiet -c SHA256SUMS) || die "the bundle's files do not match its SHA256SUMS"
manifest_get() { sed -n "s/^  \"$1\": \"\(.*\)\",*$/\1/p" "$bundle/manifest.json" | head -n 1; }
version=$(manifest_get version)
barch=$(manifest_get arch)
[ -n "$version" ] || die "the bundle's manifest has no version"
[ "$barch" = "$arch" ] || die "the bundle is for $barch; this machine is $arch"
tiers=$(sed -n 's/^  "tiers": \[\(.*\)\],*$/\1/p' "$bundle/manifest.json" | tr -d '" ' | tr , ' ')

prev=$(state_get version)
mode=cli
if ((server)) || [ "$(state_get mode)" = server ]; then mode=server; fi
if [ -n "$prev" ] && [ "$prev" != "$version" ] && ((!downgrade)); then
  newest=$(printf '%s\n%s\n' "$prev" "$version" | sort -V | tail -n 1)
  [ "$newest" = "$version" ] || die "bundle $version is older than the installed $prev (--allow-downgrade to install it)"
fi
if [ -n "$prev" ]; then
  say "upgrading bhatti $prev -> $version ($mode) under ${root:-/}"
else
  say "installing bhatti $version ($mode) under ${root:-/}"
fi
if ((!yes)) && [ -r /dev/tty ] && [ -w /dev/tty ]; then
  printf 'go ahead? [y/N] ' >/dev/tty
  read -r answer </dev/tty || answer=""
  case $answer in y|Y|yes) ;; *) die "stopped (pass --yes to skip this question)" ;; esac
fi

install_file() { # mode src dst: copied beside, then renamed over
  install -m "$1" "$2" "$3.new"
  mv -f "$3.new" "$3"
}

install_binaries() {
  mkdir -p "$lib" "$bindir"
  install_file 0755 "$bundle/bin/bhatti" "$lib/bhatti"
  install_file 0755 "$bundle/bin/lohar" "$lib/lohar"
  install_file 0755 "$bundle/install.sh" "$lib/install.sh"
  install_file 0755 "$bundle/uninstall.sh" "$lib/uninstall.sh"
  install_file 0644 "$bundle/manifest.json" "$lib/manifest.json"
  install_file 0644 "$bundle/share/install.md" "$lib/install.md"
  ln -sfn "$lib/bhatti" "$bindir/bhatti.new"
  mv -Tf "$bindir/bhatti.new" "$bindir/bhatti"
}

write_state() {
  {
    echo "# written by install.sh; read by install.sh and uninstall.sh"
    echo "version=$version"
    echo "mode=$mode"
    if [ "$mode" = server ]; then
      echo "service=$service"
      echo "created_user=$created_user"
      echo "data_dir=$data"
    fi
  } >"$state.new"
  mv -f "$state.new" "$state"
}

if [ "$mode" = cli ]; then
  install_binaries
  write_state
  say "done"
  echo "bhatti $version: $bindir/bhatti -> $lib/bhatti"
  echo "point it at a server: bhatti setup --url URL --token KEY"
  exit 0
fi

# --- server: preflight ----------------------------------------------------
need=()
for c in ip:iproute2 iptables:iptables nft:nftables "$qemu:qemu-system-$([ "$arch" = x86_64 ] && echo x86 || echo arm)" \
  useradd:passwd setsid:util-linux; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if ((${#need[@]})); then
  if command -v apt-get >/dev/null; then
    say "installing ${need[*]} (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
      die "apt-get could not install ${need[*]}"
  else
    die "missing programs; install these packages (Debian names): ${need[*]}"
  fi
fi
[ -e /dev/kvm ] || warn "no /dev/kvm: VMs will run under QEMU's software emulation (TCG), many times slower"

# The new binary checks the config before anything is stopped or replaced.
newbin=$bundle/bin/bhatti
mkdir -p "$etc"
chmod 0755 "$etc"
if [ -f "$conf" ]; then
  echo "config: keeping $conf"
else
  [ -n "$data" ] || data=$root/var/lib/bhatti
  default_image=minimal
  case " $tiers " in *" minimal "*) ;; *) default_image=${tiers%% *} ;; esac
  admins=""
  [ -z "$admin" ] || admins="\"$admin\""
  [ "$public" != none ] || public=""
  sed -e "s|@DATA_DIR@|$data|" -e "s|@LISTEN@|$listen|" -e "s|@ENGINE@|$engine|" \
    -e "s|@ADMINS@|$admins|" -e "s|@PUBLIC_LISTEN@|$public|" -e "s|@VMM_USER@|$vmm_user|" \
    -e "s|@CGROUP_PARENT@|$cgparent|" -e "s|@DEFAULT_IMAGE@|$default_image|" \
    "$bundle/share/config.toml" >"$conf.new"
  chmod 0640 "$conf.new"
  "$newbin" config check --config "$conf.new" >/dev/null || { rm -f "$conf.new"; die "the new config is invalid (see above)"; }
  mv -f "$conf.new" "$conf"
  echo "config: wrote $conf"
fi
effective=$("$newbin" config check --config "$conf" 2>&1) || die "$conf is invalid for bhatti $version: $effective"
data=$(sed -n 's/^data_dir = "\(.*\)"/\1/p' <<<"$effective" | head -n 1)
vmm_user=$(sed -n '/^\[confinement\]/,/^\[/s/^user = "\(.*\)"/\1/p' <<<"$effective" | head -n 1)
[ -n "$data" ] && [ -n "$vmm_user" ] || die "cannot read data_dir and confinement.user from $conf"

created_user=$(state_get created_user)
if ! getent passwd "$vmm_user" >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "bhatti VMMs" "$vmm_user"
  created_user=$vmm_user
  echo "system user $vmm_user created (the VMMs run as it)"
fi
service=self
((systemd)) && service=systemd

# --- server: stop, replace, start -----------------------------------------
stop_daemon

install_binaries
# The daemon makes the data dir 0700 (sandboxes hold tenants' files).
mkdir -p "$data/images"
chmod 0700 "$data"
chmod 0755 "$data/images"

# Images: kernel and initramfs are always the bundle's (a cold sandbox's
# memory holds its own copy; the next boot takes the new ones). A tier
# rootfs is the lower layer of every sandbox disk made from it: a changed
# one replaces the old only while there are no sandboxes, or with
# --replace-images.
have_sandboxes=0
[ -n "$(ls -A "$data/sandboxes" 2>/dev/null)" ] && have_sandboxes=1
for art in kernel initramfs $tiers; do
  from=$bundle/images/$art
  to=$data/images/$art
  if [ -f "$to/manifest.json" ] && cmp -s "$from/manifest.json" "$to/manifest.json"; then
    echo "image $art: unchanged"
    continue
  fi
  if [ -d "$to" ] && ((have_sandboxes && !replace_images)) && [ "$art" != kernel ] && [ "$art" != initramfs ]; then
    warn "image $art: the bundle's differs, but sandboxes exist on the installed one: kept (--replace-images to replace)"
    continue
  fi
  rm -rf "$to.new" "$to.old"
  mkdir -p "$to.new"
  cp --sparse=always "$from"/* "$to.new/"
  chmod 0755 "$to.new"
  chmod 0644 "$to.new"/*
  [ -d "$to" ] && mv "$to" "$to.old"
  mv "$to.new" "$to"
  rm -rf "$to.old"
  echo "image $art: installed"
done

mkdir -p "$(dirname "$unit")" "$logdir"
chmod 0750 "$logdir"
sed -e "s|@BIN@|$lib/bhatti|" -e "s|@CONFIG@|$conf|" -e "s|@LIBDIR@|$lib|" \
  "$bundle/share/bhatti.service" >"$unit.new"
chmod 0644 "$unit.new"
mv -f "$unit.new" "$unit"
write_state

if ((start)); then
  if ((systemd)); then
    say "starting bhatti.service (systemd; enabled at boot)"
  elif [ -n "$root" ]; then
    say "starting the daemon (--root: this script runs it, not systemd; log $log)"
  else
    say "starting the daemon: systemd is not running here (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)), so this script runs it; log $log"
    echo "install.sh stop|start|restart|status manages it ($lib/install.sh); it does not start at boot"
  fi
  start_daemon
else
  echo "not started (--no-start)"
fi

if [ -n "$admin" ]; then
  users=$("$lib/bhatti" user list --json --data-dir "$data") || die "cannot list users in $data"
  if grep -q "\"name\": \"$admin\"" <<<"$users"; then
    echo "user $admin exists; no new key (bhatti user rotate-key $admin --data-dir $data issues one)"
  else
    key=$("$lib/bhatti" user create --name "$admin" --quiet --data-dir "$data") || die "cannot create user $admin"
    if [ -n "$admin_key_file" ]; then
      (umask 077 && printf '%s\n' "$key" >"$admin_key_file")
      echo "API key of $admin written to $admin_key_file"
    fi
    echo "admin key for $admin (shown once): $key"
  fi
fi

say "done: bhatti $version"
echo "binaries: $lib (bhatti linked from $bindir/bhatti)"
echo "config:   $conf"
echo "data:     $data"
echo "unit:     $unit"
url=$(probe_url)
echo "client:   bhatti setup --url $url --token KEY"
