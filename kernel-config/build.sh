#!/usr/bin/env bash
# Builds the msb-vmm guest kernel: Debian's linux-source-6.12 + `make allnoconfig` + our fragment,
# into an uncompressed vmlinux with a PVH entry note (x86_64), or an arm64 `Image` built with
# Debian's cross compiler (aarch64, on any host).
#
#   kernel-config/build.sh [--arch x86_64|aarch64] [--print-path]
#
# The result is cached outside the work tree, keyed by a hash of (source package version,
# fragment, recipe number), in $MSB_CACHE_DIR (default ${XDG_CACHE_HOME:-~/.cache}/msb-vmm):
#   kernel/<key>/<file>, kernel/<key>/config, and the link <file>-<arch> -> kernel/<key>/<file>
# (vmlinux-x86_64, Image-aarch64) that `msb-vmm run` uses by default. A second run with nothing
# changed is instant. Prints the kernel's path on stdout as its last line; progress goes to stderr.
set -euo pipefail

arch=x86_64
print_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --print-path) print_only=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
# karch: the kernel's ARCH; target: what make builds; built: where it lands; file: its name here.
cross=""
case "$arch" in
  x86_64) karch=x86_64; target=vmlinux; built=vmlinux; file=vmlinux ;;
  aarch64) karch=arm64; target=Image; built=arch/arm64/boot/Image; file=Image
           [ "$(uname -m)" = aarch64 ] || cross=aarch64-linux-gnu- ;;
  *) echo "build.sh: --arch is x86_64 or aarch64, not '$arch'" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
fragment="$here/$arch.config"
cache="${MSB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/msb-vmm}"
log() { echo "[kernel] $*" >&2; }

# Build dependencies, installed only when missing (CI and fresh machines run this as root).
need_pkgs=()
dpkg-query -W -f='${Status}' linux-source-6.12 2>/dev/null | grep -q "ok installed" || need_pkgs+=(linux-source-6.12)
for tool in gcc:build-essential make:build-essential flex:flex bison:bison bc:bc xz:xz-utils \
            perl:perl; do
  command -v "${tool%%:*}" >/dev/null || need_pkgs+=("${tool#*:}")
done
[ -z "$cross" ] || command -v "${cross}gcc" >/dev/null || need_pkgs+=(gcc-aarch64-linux-gnu)
[ -e /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || need_pkgs+=(libssl-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "build.sh: missing packages: ${need_pkgs[*]}; install them with: sudo apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
  log "installing ${need_pkgs[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.12)
tarball=/usr/src/linux-source-6.12.tar.xz
# Bump when a change to this script changes what it produces (not for cosmetic changes).
recipe=1
key=$( { echo "$src_version recipe=$recipe"; cat "$fragment"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
link="$cache/$file-$arch"

if [ -f "$out/$file" ]; then
  ln -sfn "kernel/$key/$file" "$link"
  log "cached: $out/$file (linux-source-6.12 $src_version)"
  echo "$out/$file"
  exit 0
fi
if [ $print_only = 1 ]; then
  echo "build.sh: the kernel for this fragment is not built yet; run kernel-config/build.sh" >&2
  exit 1
fi

mkdir -p "$cache/kernel"
work=$(mktemp -d "$cache/kernel/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building linux-source-6.12 $src_version with $(basename "$fragment") (key $key)"
log "unpacking sources"
tar -C "$work" -xf "$tarball"
srcdir="$work/linux-source-6.12"

# Fragment lines in the `=n` form are written as `# CONFIG_X is not set` for Kconfig.
sed -E 's/^(CONFIG_[A-Za-z0-9_]+)=n$/# \1 is not set/' "$fragment" > "$work/allconfig"
log "configuring (allnoconfig + fragment)"
make -s -C "$srcdir" ARCH="$karch" CROSS_COMPILE="$cross" KCONFIG_ALLCONFIG="$work/allconfig" allnoconfig >&2

# Every line of the fragment must hold in the final configuration.
bad=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) ;; *) continue ;; esac
  name=${line%%=*}; want=${line#*=}
  got=$(grep -E "^$name=" "$srcdir/.config" | cut -d= -f2- || true)
  [ -n "$got" ] || got=n
  if [ "$got" != "$want" ]; then
    echo "build.sh: $name is '$got' in the final config, the fragment asks for '$want' (a missing dependency or a renamed option)" >&2
    bad=1
  fi
done < "$fragment"
[ $bad = 0 ] || exit 1

jobs=$(nproc)
log "compiling $file for $arch with $jobs jobs (about 5 minutes on 2 cores)"
start=$(date +%s)
# Progress: one line per 250 compiled objects instead of thousands of CC lines.
make --no-print-directory -C "$srcdir" ARCH="$karch" CROSS_COMPILE="$cross" -j"$jobs" "$target" 2>&1 | awk -v s="$start" '
  /^  [A-Z0-9_]+ / { n++; if (n % 250 == 0) { printf("[kernel] %d objects, %ds\n", n, systime() - s) > "/dev/stderr" } next }
  { print > "/dev/stderr" }'
[ "${PIPESTATUS[0]}" = 0 ] || { echo "build.sh: kernel build failed (see the lines above)" >&2; exit 1; }

# Refuse a kernel without the PVH entry note: msb-vmm would fall back to the slower 64-bit boot.
if [ "$arch" = x86_64 ] && ! readelf -n "$srcdir/vmlinux" | grep -q "Xen.*0x00000012\|Unknown note type: (0x00000012)\|PHYS32_ENTRY"; then
  echo "build.sh: vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH set?" >&2
  exit 1
fi

# An arm64 Image starts with its boot header: the magic "ARM\x64" at byte 56.
if [ "$arch" = aarch64 ] && [ "$(dd if="$srcdir/$built" bs=1 skip=56 count=4 2>/dev/null | od -An -tx1 | tr -d ' ')" != 41524d64 ]; then
  echo "build.sh: $built has no arm64 Image header" >&2
  exit 1
fi

mkdir -p "$out.part"
cp "$srcdir/$built" "$out.part/$file"
cp "$srcdir/.config" "$out.part/config"
echo "$src_version" > "$out.part/source-version"
rm -rf "$out"; mv "$out.part" "$out"
ln -sfn "kernel/$key/$file" "$link"
log "built $out/$file in $(( $(date +%s) - start ))s ($(du -h "$out/$file" | cut -f1))"
echo "$out/$file"
