#!/bin/sh
# debootstrap's second stage for a foreign-architecture tree, run inside that architecture's
# L2 VM by rootfs/build.sh (busybox sh there): the tree is copied into the VM's own tmpfs, since
# device nodes on the 9p share cannot be opened (debootstrap's /dev/null check fails), finished
# there, and copied back into a fresh directory on the share.
#
#   second-stage.sh FIRST-STAGE-DIR OUT-DIR
set -eu
src=$1 out=$2
mkdir -p /stage
mount -t tmpfs -o size=3g tmpfs /stage
tar -C "$src" -cf - . | tar -C /stage -xpf -
chroot /stage /debootstrap/debootstrap --second-stage
# What debootstrap left mounted inside the tree must not be copied.
for m in /stage/proc /stage/sys /stage/dev/pts /stage/dev; do
  umount "$m" 2>/dev/null || true
done
mkdir -p "$out"
tar -C /stage -cf - . | tar -C "$out" -xpf -
sync
