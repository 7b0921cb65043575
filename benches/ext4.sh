#!/usr/bin/env bash
# ext4 benchmark, side by side in one run on the same root tarball:
#   kiln mkfs ROOT.tar OUT.img --size S              (tar stream -> image, no unpacking)
#   tar -x + mke2fs -t ext4 -d DIR OUT.img S         (the reference)
# Reports wall times, the ratio, and kiln's peak RSS.
#
# Usage: benches/ext4.sh [ROOTFS.tar] [SIZE] [ROUNDS]
#   ROOTFS.tar defaults to the newest staged Debian base in the kiln cache; SIZE to 2G.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${KILN_CACHE_DIR:-/var/cache/kiln}
tar=${1:-$(ls -t "$cache"/bases/bookworm-amd64-*.tar 2>/dev/null | head -1)}
size=${2:-2G}
rounds=${3:-3}
[ -f "$tar" ] || { echo "no root tarball: pass one, or build recipes/debian-12-minimal.toml first" >&2; exit 2; }
cargo build --release -q
kiln=${CARGO_TARGET_DIR:-target}/release/kiln
work=$(mktemp -d /var/tmp/kiln-ext4-bench.XXXXXX); trap 'rm -rf "$work"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
: > "$work/k"; : > "$work/r"; : > "$work/m"
echo "root tarball: $tar ($(du -h "$tar" | cut -f1)), file system size $size"
for i in $(seq "$rounds"); do
  rm -rf "$work/root" "$work"/*.img; sync
  /usr/bin/time -f "%e %U %S" -o "$work/reftime" bash -c 'mkdir "$1/root" && tar -xpf "$2" -C "$1/root" --numeric-owner && mke2fs -q -F -t ext4 -d "$1/root" "$1/ref.img" "$3" >/dev/null 2>&1' _ "$work" "$tar" "$size"
  read -r ref ru rsys < "$work/reftime"
  sync
  /usr/bin/time -f "%e %M %U %S" -o "$work/time" env SOURCE_DATE_EPOCH=1700000000 "$kiln" mkfs "$tar" "$work/kiln.img" --size "${size}iB" 2>/dev/null
  read -r ks km ku ksys < "$work/time"
  e2fsck -fn "$work/kiln.img" >/dev/null 2>&1
  echo "round $i: tar -x + mke2fs -d ${ref}s (user ${ru}s, sys ${rsys}s)   kiln mkfs ${ks}s (user ${ku}s, sys ${ksys}s, peak RSS $((km / 1024)) MiB, e2fsck clean)"
  echo "$ref" >> "$work/r"; echo "$ks" >> "$work/k"; echo "$km" >> "$work/m"
done
r=$(median < "$work/r"); k=$(median < "$work/k"); m=$(sort -n "$work/m" | tail -1)
echo "median: reference ${r}s, kiln ${k}s -> kiln is $(awk -v r="$r" -v k="$k" 'BEGIN{printf "%.1f", r/k}')x faster; kiln peak RSS $((m / 1024)) MiB"
