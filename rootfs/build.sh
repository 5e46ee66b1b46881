#!/usr/bin/env bash
# Builds the default guest root file system: a Debian bookworm minbase made with debootstrap,
# so apt, bash and coreutils behave in a sandbox as users expect.
#
#   rootfs/build.sh [--print-path]
#
# The tree is cached outside the work tree, keyed by a hash of this recipe, in $MSB_CACHE_DIR
# (default ${XDG_CACHE_HOME:-~/.cache}/msb-vmm): rootfs/<key>/ and the link rootfs-debian ->
# rootfs/<key> that `msb-vmm run` boots by default (read-only, with the guest's changes in an
# overlay in guest memory). A second run with nothing changed is instant.
# $MSB_DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian).
# debootstrap needs root (it creates device nodes and root-owned files).
set -euo pipefail

print_only=0
case "${1:-}" in
  --print-path) print_only=1 ;;
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "rootfs/build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

suite=bookworm
mirror="${MSB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Beyond minbase: TLS roots, ps/ip, python3 and curl, which sandbox users reach for first.
include=ca-certificates,procps,iproute2,python3,curl
# Bump when a change here changes the tree (not for cosmetic changes).
recipe=1
cache="${MSB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/msb-vmm}"
key=$(echo "$suite $include recipe=$recipe" | sha256sum | cut -c1-16)
out="$cache/rootfs/$key"
link="$cache/rootfs-debian"
log() { echo "[rootfs] $*" >&2; }

if [ "$print_only" = 1 ]; then echo "$out"; exit 0; fi
if [ -e "$out.complete" ] && [ -d "$out" ]; then
  ln -sfn "rootfs/$key" "$link"
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

tmp="$cache/rootfs/.$key.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
log "debootstrap --variant=minbase $suite from $mirror (a few minutes, once)"
if ! debootstrap --variant=minbase --include="$include" "$suite" "$tmp" "$mirror" >"$cache/rootfs/.$key.log" 2>&1; then
  tail -20 "$cache/rootfs/.$key.log" >&2
  echo "rootfs/build.sh: debootstrap failed (full log: $cache/rootfs/.$key.log)" >&2
  exit 1
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
ln -sfn "rootfs/$key" "$link"
# Trees from older recipes are ~200 MB each and nothing boots them any more.
for old in "$cache"/rootfs/*.complete; do
  [ "$old" = "$out.complete" ] || rm -rf "${old%.complete}" "$old"
done
log "$(du -sh "$out" | cut -f1) in $out"
echo "$out"
