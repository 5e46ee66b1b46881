#!/usr/bin/env bash
# Builds the default guest root file system: a Debian bookworm minbase made with debootstrap,
# so apt, bash and coreutils behave in a sandbox as users expect.
#
#   rootfs/build.sh [--arch x86_64|aarch64] [--print-path]
#
# The tree is cached outside the work tree, keyed by a hash of this recipe, in $MSB_CACHE_DIR
# (default ${XDG_CACHE_HOME:-~/.cache}/msb-vmm): rootfs/<key>/ and the link rootfs-debian ->
# rootfs/<key> that `msb-vmm run` boots by default (read-only, with the guest's changes in an
# overlay in guest memory); for aarch64 rootfs-aarch64/<key> and rootfs-debian-aarch64. A
# second run with nothing changed is instant. An arm64 tree on another host is bootstrapped in
# two stages: the packages unpacked here, their scripts run under qemu-user-static where
# binfmt_misc has an aarch64 handler, else inside the arm64 L2 VM (scripts/l2run).
# $MSB_DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian).
# debootstrap needs root (it creates device nodes and root-owned files).
set -euo pipefail

print_only=0
arch=x86_64
while [ $# -gt 0 ]; do
  case "$1" in
    --print-path) print_only=1; shift ;;
    --arch) arch="${2:-}"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "rootfs/build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
case "$arch" in
  x86_64) deb_arch=amd64; dir=rootfs; name=rootfs-debian ;;
  aarch64) deb_arch=arm64; dir=rootfs-aarch64; name=rootfs-debian-aarch64 ;;
  *) echo "rootfs/build.sh: --arch is x86_64 or aarch64, not '$arch'" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")/.." && pwd)

suite=bookworm
mirror="${MSB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Beyond minbase: TLS roots, ps/ip, python3 and curl, which sandbox users reach for first.
include=ca-certificates,procps,iproute2,python3,curl
# Bump when a change here changes the tree (not for cosmetic changes).
recipe=1
cache="${MSB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/msb-vmm}"
key=$(echo "$suite $include recipe=$recipe" | sha256sum | cut -c1-16)
out="$cache/$dir/$key"
link="$cache/$name"
log() { echo "[rootfs] $*" >&2; }

if [ "$print_only" = 1 ]; then echo "$out"; exit 0; fi
if [ -e "$out.complete" ] && [ -d "$out" ]; then
  ln -sfn "$dir/$key" "$link"
  echo "$out"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "rootfs/build.sh: debootstrap needs root: run sudo ./x setup once (or pass --rootfs DIR / --rootfs initramfs to msb-vmm)" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

tmp="$cache/$dir/.$key.tmp"
blog="$cache/$dir/.$key.log"
rm -rf "$tmp"
mkdir -p "$tmp"
failed() {
  tail -20 "$blog" >&2
  echo "rootfs/build.sh: $1 failed (full log: $blog)" >&2
  exit 1
}
native=$(dpkg --print-architecture)
if [ "$deb_arch" = "$native" ]; then
  log "debootstrap --variant=minbase $suite from $mirror (a few minutes, once)"
  debootstrap --variant=minbase --include="$include" "$suite" "$tmp" "$mirror" >"$blog" 2>&1 \
    || failed debootstrap
else
  log "debootstrap --foreign --arch=$deb_arch --variant=minbase $suite from $mirror (once)"
  debootstrap --foreign --arch="$deb_arch" --variant=minbase --include="$include" "$suite" "$tmp" \
    "$mirror" >"$blog" 2>&1 || failed "debootstrap (first stage)"
  if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && [ -x /usr/bin/qemu-aarch64-static ]; then
    log "second stage under qemu-user-static"
    cp /usr/bin/qemu-aarch64-static "$tmp/usr/bin/"
    chroot "$tmp" /debootstrap/debootstrap --second-stage >>"$blog" 2>&1 \
      || failed "debootstrap (second stage)"
    rm -f "$tmp/usr/bin/qemu-aarch64-static"
  else
    log "second stage inside the arm64 L2 VM (no binfmt_misc handler for aarch64 here; 10-20 minutes, once)"
    rm -rf "$tmp.2"
    "$here/scripts/l2run" --arch aarch64 --mem 4G --timeout 3600 --idle-timeout 1200 -- \
      "$here/rootfs/second-stage.sh" "$tmp" "$tmp.2" >>"$blog" 2>&1 \
      || failed "debootstrap (second stage, in the arm64 L2 VM)"
    rm -rf "$tmp"
    mv "$tmp.2" "$tmp"
  fi
fi
# Downloaded packages are dead weight in every sandbox; the package lists are fetched again by
# `apt update` in the guest (which needs the network).
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/* "$tmp"/var/log/* \
  "$tmp"/debootstrap
echo msb > "$tmp/etc/hostname"
# msb-init mounts /proc, /sys, /dev, /tmp and /run; the guest's names resolve through the
# gateway once the network exists.
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$tmp/etc/hosts"
rm -rf "$out"
mv "$tmp" "$out"
touch "$out.complete"
ln -sfn "$dir/$key" "$link"
# Trees from older recipes are ~200 MB each and nothing boots them any more.
for old in "$cache/$dir"/*.complete; do
  [ "$old" = "$out.complete" ] || rm -rf "${old%.complete}" "$old"
done
log "$(du -sh "$out" | cut -f1) in $out"
echo "$out"
