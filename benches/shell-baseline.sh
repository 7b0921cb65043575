#!/usr/bin/env bash
# The reference kiln's assembly is measured against: the same kind of disk made the usual way,
# with the standard host tools and a scratch directory:
#   tar -x  →  mkfs.vfat + mtools (ESP with systemd-boot, kernel, initrd, loader entry)
#           →  mke2fs -d (ext4 root from the unpacked tree)
#           →  sgdisk (GPT), dd (partitions into the disk), sha256sum (checksum file)
#
# Usage: benches/shell-baseline.sh ROOTFS.tar OUT.raw [SIZE_MIB]   (SIZE_MIB defaults to 2048)
# Needs root (tar -x keeps owners), e2fsprogs, dosfstools, mtools and gdisk.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 ROOTFS.tar OUT.raw [SIZE_MIB]" >&2; exit 2; }
rootfs=$1 out=$2 size_mib=${3:-2048}
esp_mib=256
# 1 MiB before the first partition, 1 MiB (and the backup GPT) after the last.
root_mib=$((size_mib - esp_mib - 2))
scratch=$(mktemp -d /var/tmp/kiln-baseline.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

tree="$scratch/tree"
mkdir "$tree"
tar -C "$tree" --numeric-owner -xpf "$rootfs"

# The ESP: the boot loader for the removable-media path, the newest kernel and initrd, and a
# loader entry booting the root by its partition label.
kernel=$(find "$tree/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)
[ -n "$kernel" ] || { echo "no kernel in $rootfs" >&2; exit 1; }
initrd="$tree/boot/initrd.img-${kernel##*/vmlinuz-}"
esp="$scratch/esp.img"
truncate -s "${esp_mib}M" "$esp"
mkfs.vfat -F 32 -n ESP "$esp" >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mcopy -i "$esp" "$tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$kernel" ::/vmlinuz
mcopy -i "$esp" "$initrd" ::/initrd.img
printf 'default debian.conf\ntimeout 0\n' > "$scratch/loader.conf"
printf 'title Debian\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=PARTLABEL=root rw console=ttyS0\n' > "$scratch/debian.conf"
mcopy -i "$esp" "$scratch/loader.conf" ::/loader/loader.conf
mcopy -i "$esp" "$scratch/debian.conf" ::/loader/entries/debian.conf

# The root file system, populated from the unpacked tree.
root="$scratch/root.img"
mke2fs -q -F -t ext4 -L root -d "$tree" "$root" "${root_mib}M"

# The disk: a GPT with both partitions, their images copied in (holes kept), then the checksum.
truncate -s "${size_mib}M" "$out"
sgdisk -q --zap-all \
  -n "1:1M:+${esp_mib}M" -t 1:EF00 -c 1:ESP \
  -n "2:0:+${root_mib}M" -t 2:8304 -c 2:root "$out" >/dev/null
dd if="$esp" of="$out" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$root" of="$out" bs=1M seek=$((1 + esp_mib)) conv=notrunc,sparse status=none
sha256sum "$out" > "$out.sha256"
