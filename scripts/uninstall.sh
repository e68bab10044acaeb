#!/usr/bin/env bash
# Removes what install.sh installed (docs/install.md): stops the daemon,
# ends VMMs left behind, removes bhatti's firewall rules, nftables table,
# bridges and TAPs, its cgroups, the unit, the binaries, the config, the
# logs and the VMM user install.sh created. The data directory (sandboxes,
# images, database) stays unless --purge.
#
#   --purge         remove the data directory too
#   --keep-config   keep /etc/bhatti/config.toml
#   --root DIR      the --root the install used (also $BHATTI_INSTALL_ROOT)
#   --yes           do not ask
set -euo pipefail

die() { printf 'uninstall.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '== %s\n' "$*"; }
warn() { printf 'uninstall.sh: warning: %s\n' "$*" >&2; }

purge=0
keep_config=0
yes=0
root=${BHATTI_INSTALL_ROOT:-}
while (($#)); do
  case $1 in
    --purge) purge=1; shift ;;
    --keep-config) keep_config=1; shift ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --yes|-y) yes=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root (sudo)"
if [ -n "$root" ]; then
  case $root in /*) ;; *) die "--root must be an absolute path" ;; esac
  root=${root%/}
fi

etc=$root/etc/bhatti
conf=$etc/config.toml
lib=$root/usr/local/lib/bhatti
bindir=$root/usr/local/bin
unit=$root/etc/systemd/system/bhatti.service
logdir=$root/var/log/bhatti
rundir=$root/run/bhatti
pidfile=$rundir/bhatti.pid
state=$lib/install-state

[ -f "$state" ] || die "no bhatti install under ${root:-/} ($state does not exist)"
state_get() { sed -n "s/^$1=//p" "$state" | tail -n 1; }
mode=$(state_get mode)
service=$(state_get service)
created_user=$(state_get created_user)
data=$(state_get data_dir)

say "removing bhatti $(state_get version) ($mode) from ${root:-/}$( ((purge)) && echo ', data included')"
if ((!yes)) && [ -r /dev/tty ] && [ -w /dev/tty ]; then
  printf 'go ahead? [y/N] ' >/dev/tty
  read -r answer </dev/tty || answer=""
  case $answer in y|Y|yes) ;; *) die "stopped (pass --yes to skip this question)" ;; esac
fi

if [ "$mode" = server ]; then
  # What the config names, read before the binary goes.
  bridge_prefix=bhu tap_prefix=tu cgparent=bhatti firewall=true
  if [ -x "$lib/bhatti" ] && eff=$("$lib/bhatti" config check --config "$conf" 2>/dev/null); then
    get() { sed -n "/^\[$1\]/,/^\[/s/^$2 = \"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" <<<"$eff" | head -n 1; }
    data=$(sed -n 's/^data_dir = "\(.*\)"/\1/p' <<<"$eff" | head -n 1)
    bridge_prefix=$(get network bridge_prefix)
    tap_prefix=$(get network tap_prefix)
    firewall=$(get network firewall)
    cgparent=$(get confinement cgroup_parent)
  else
    warn "cannot read $conf; using the default names"
  fi
  [ -n "$data" ] || die "no data directory known (state and config both lack it)"

  say "stopping the daemon"
  if [ "$service" = systemd ]; then
    systemctl disable --now bhatti.service 2>/dev/null || true
  elif pid=$(cat "$pidfile" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] &&
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -F -- " serve --config $conf" >/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 1500); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { warn "the daemon did not stop in 150 s; killing it"; kill -KILL "$pid"; }
  fi
  rm -rf "$rundir"

  # VMMs left behind (a daemon killed hard leaves hot ones running): any
  # process whose command line names a sandbox directory of this data dir.
  vmms() {
    local p
    for p in /proc/[0-9]*; do
      tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -F -- "$data/sandboxes/" >/dev/null && echo "${p#/proc/}"
    done
    return 0
  }
  left=$(vmms)
  if [ -n "$left" ]; then
    say "ending VMMs left running: $(echo $left)"
    kill -TERM $left 2>/dev/null || true
    for _ in $(seq 1 50); do [ -z "$(vmms)" ] && break; sleep 0.1; done
    left=$(vmms)
    [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
  fi

  if [ "$firewall" != false ] && [ -x "$lib/bhatti" ]; then
    say "firewall rules (iptables BHATTI-* chains, nftables table bhatti)"
    "$lib/bhatti" serve --cleanup || warn "removing the firewall rules failed"
  fi

  # Bridges <prefix><4 hex> and TAPs <prefix><8 hex>, the names the daemon gives.
  links=$(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 |
    grep -E "^(${bridge_prefix}[0-9a-f]{4}|${tap_prefix}[0-9a-f]{8})$" || true)
  if [ -n "$links" ]; then
    say "links: $(echo $links)"
    for l in $links; do ip link del "$l" 2>/dev/null || true; done
  fi

  # The VMMs' cgroups: empty once the VMMs are gone.
  for cg in /sys/fs/cgroup /sys/fs/cgroup/memory /sys/fs/cgroup/cpu /sys/fs/cgroup/pids; do
    [ -n "$cgparent" ] && [ -d "$cg/$cgparent" ] || continue
    find "$cg/$cgparent" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ -d "$cg/$cgparent" ] && warn "cgroup $cg/$cgparent is not empty; left in place"
  done

  say "unit, logs"
  rm -f "$unit"
  [ "$service" = systemd ] && systemctl daemon-reload 2>/dev/null || true
  rm -rf "$logdir"
fi

say "binaries"
[ "$(readlink "$bindir/bhatti" 2>/dev/null)" = "$lib/bhatti" ] && rm -f "$bindir/bhatti"
rm -rf "$lib"

if [ "$mode" = server ]; then
  if ((keep_config)); then
    echo "config kept: $conf"
  else
    rm -f "$conf"
    rmdir "$etc" 2>/dev/null || true
  fi
  if [ -n "$created_user" ] && getent passwd "$created_user" >/dev/null; then
    say "system user $created_user"
    userdel "$created_user" 2>/dev/null || warn "cannot remove user $created_user"
    getent group "$created_user" >/dev/null && groupdel "$created_user" 2>/dev/null || true
  fi
  if ((purge)); then
    case $data in /|"") die "refusing to remove data directory '$data'" ;; esac
    say "data directory $data"
    rm -rf "$data"
  else
    echo "data kept: $data (uninstall.sh --purge removes it)"
  fi
fi
say "done"
