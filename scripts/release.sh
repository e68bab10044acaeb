#!/usr/bin/env bash
# Builds a versioned release bundle for this machine's architecture:
#
#   dist/bhatti-<version>-linux-<arch>.tar.gz   (+ .sha256 beside it)
#
# holding bhatti (release build), the static lohar, the guest kernel,
# initramfs and tier images, the systemd unit, a default config,
# install.sh, uninstall.sh, manifest.json and SHA256SUMS. See docs/install.md.
#
#   --version V     bundle version (default: the workspace version, plus
#                   +g<commit> when built from a git checkout)
#   --tiers LIST    image tiers, comma-separated (default: minimal,tiny)
#   --images DIR    reuse built images: a DATA/images directory (kernel/,
#                   initramfs/, <tier>/) instead of `bhatti image build`
#   --bhatti PATH   reuse a built bhatti instead of `cargo build --release`
#   --lohar PATH    reuse a static lohar instead of scripts/build-lohar.sh
#   --out DIR       where the bundle goes (default: dist/)
#
# The same settings as environment variables: BHATTI_RELEASE_VERSION,
# BHATTI_RELEASE_TIERS, BHATTI_RELEASE_IMAGES, BHATTI_RELEASE_BHATTI,
# BHATTI_RELEASE_LOHAR, BHATTI_RELEASE_OUT; BHATTI_RELEASE_GZIP is the gzip
# level (1-9, default 6).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
die() { printf 'release.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '== %s\n' "$*"; }

version=${BHATTI_RELEASE_VERSION:-}
tiers=${BHATTI_RELEASE_TIERS:-minimal,tiny}
images=${BHATTI_RELEASE_IMAGES:-}
bhatti=${BHATTI_RELEASE_BHATTI:-}
lohar=${BHATTI_RELEASE_LOHAR:-}
out=${BHATTI_RELEASE_OUT:-$root/dist}
while (($#)); do
  case $1 in
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --tiers) tiers=${2:?--tiers needs a value}; shift 2 ;;
    --images) images=${2:?--images needs a directory}; shift 2 ;;
    --bhatti) bhatti=${2:?--bhatti needs a path}; shift 2 ;;
    --lohar) lohar=${2:?--lohar needs a path}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

case $(uname -m) in
  x86_64) arch=x86_64 ;;
  aarch64|arm64) arch=aarch64 ;;
  *) die "unsupported architecture $(uname -m): bundles are built for x86_64 and aarch64" ;;
esac
if [ -z "$version" ]; then
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
  [ -n "$version" ] || die "no version in Cargo.toml; pass --version"
  if sha=$(git rev-parse --short=10 HEAD 2>/dev/null); then version="$version+g$sha"; fi
fi
[[ $version =~ ^[0-9A-Za-z][0-9A-Za-z.+_-]*$ ]] || die "version '$version': letters, digits and . + _ - only"
IFS=, read -r -a tier_list <<<"$tiers"
((${#tier_list[@]})) || die "--tiers is empty"
for t in "${tier_list[@]}"; do
  case $t in tiny|minimal) ;; *) die "unknown tier '$t' (tiny, minimal)" ;; esac
done

if [ -z "$bhatti" ]; then
  say "release build of bhatti"
  cargo build --release --quiet -p bhatti
  bhatti=${CARGO_TARGET_DIR:-$root/target}/release/bhatti
fi
[ -x "$bhatti" ] || die "bhatti binary $bhatti is not an executable file"
if [ -z "$lohar" ]; then
  say "static lohar"
  lohar=$(bash scripts/build-lohar.sh | tail -n 1)
  case $lohar in /*) ;; *) lohar=${CARGO_TARGET_DIR:-$root/target}/${lohar#target/} ;; esac
fi
[ -f "$lohar" ] || die "lohar $lohar does not exist"
if ldd "$lohar" 2>&1 | grep "=>" >/dev/null; then die "lohar $lohar is dynamically linked; the guest needs a static one"; fi

name=bhatti-$version-linux-$arch
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/$name
mkdir -p "$stage/bin" "$stage/images" "$stage/share"

if [ -z "$images" ]; then
  say "guest images (${tier_list[*]}) with bhatti image build"
  for t in "${tier_list[@]}"; do
    "$bhatti" image build --data-dir "$work/data" --tier "$t" --lohar "$lohar"
  done
  images=$work/data/images
fi
[ -d "$images" ] || die "images directory $images does not exist"
for f in kernel/vmlinux kernel/vmlinuz kernel/release kernel/manifest.json \
  initramfs/initramfs.cpio initramfs/manifest.json; do
  [ -f "$images/$f" ] || die "$images/$f is missing (not a built image directory?)"
done
for t in "${tier_list[@]}"; do
  [ -f "$images/$t/rootfs.ext4" ] && [ -f "$images/$t/manifest.json" ] ||
    die "tier $t is not built in $images (bhatti image build --tier $t)"
done
# The initramfs carries lohar as the guest's /init: the bundle's lohar must
# be that one, or an image rebuilt on the server would differ from the shipped.
lohar_sha=$(sha256sum "$lohar" | cut -d' ' -f1)
grep -q "\"lohar_sha256\": \"$lohar_sha\"" "$images/initramfs/manifest.json" ||
  die "the initramfs in $images was built with another lohar than $lohar; rebuild the images or pass the matching --lohar"

say "staging $name"
install -m 0755 "$bhatti" "$stage/bin/bhatti"
install -m 0755 "$lohar" "$stage/bin/lohar"
# The kernel's modules/ tree only feeds initramfs builds; the initramfs
# already holds the modules the guest loads.
mkdir -p "$stage/images/kernel" "$stage/images/initramfs"
cp --sparse=always "$images"/kernel/{vmlinux,vmlinuz,release,manifest.json} "$stage/images/kernel/"
cp --sparse=always "$images"/initramfs/{initramfs.cpio,manifest.json} "$stage/images/initramfs/"
for t in "${tier_list[@]}"; do
  mkdir -p "$stage/images/$t"
  cp --sparse=always "$images/$t"/{rootfs.ext4,manifest.json} "$stage/images/$t/"
done
install -m 0644 packaging/bhatti.service packaging/config.toml docs/install.md "$stage/share/"
install -m 0755 scripts/install.sh scripts/uninstall.sh "$stage/"
printf '%s\n' "$version" >"$stage/VERSION"

# SHA256SUMS: every file but itself and the manifest; install.sh checks it.
(cd "$stage" && find . -type f | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum) >"$work/SHA256SUMS"
mv "$work/SHA256SUMS" "$stage/SHA256SUMS"
{
  printf '{\n  "name": "bhatti",\n  "version": "%s",\n  "arch": "%s",\n' "$version" "$arch"
  printf '  "built_at_unix": %s,\n' "$(date +%s)"
  printf '  "tiers": [%s],\n' "$(printf '"%s",' "${tier_list[@]}" | sed 's/,$//')"
  printf '  "files": [\n'
  sep=""
  while read -r sum path; do
    size=$(stat -c %s "$stage/$path")
    printf '%s    {"path": "%s", "size": %s, "sha256": "%s"}' "$sep" "$path" "$size" "$sum"
    sep=$',\n'
  done <"$stage/SHA256SUMS"
  printf '\n  ]\n}\n'
} >"$stage/manifest.json"

say "packing"
mkdir -p "$out"
tarball=$out/$name.tar.gz
tar --sparse --owner=0 --group=0 --numeric-owner -C "$work" -cf - "$name" | gzip "-${BHATTI_RELEASE_GZIP:-6}" >"$tarball.tmp"
mv "$tarball.tmp" "$tarball"
(cd "$out" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
echo "bundle: $tarball ($(du -h --apparent-size "$tarball" | cut -f1))"
echo "checksum: $tarball.sha256"
echo "$tarball"
