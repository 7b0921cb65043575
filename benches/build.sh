#!/usr/bin/env bash
# Assembly benchmark, side by side in one run on the same root tarball:
#   kiln build (recipe with base = { tarball }) -> finished raw disk + SHA-256 + block digests
#   benches/shell-baseline.sh                   -> tar -x, mkfs.vfat + mtools, mke2fs -d, sgdisk, dd, sha256sum
# and the rebuild time after changing one file with the staged base cached.
#
# Usage: benches/build.sh [ROOTFS.tar] [ROUNDS]
#   ROOTFS.tar defaults to the newest staged Debian base in the kiln cache (build
#   recipes/debian-12-minimal.toml once first), ROUNDS to 3. Prints medians and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${KILN_CACHE_DIR:-/var/cache/kiln}
tar=${1:-$(ls -t "$cache"/bases/bookworm-amd64-*.tar 2>/dev/null | head -1)}
rounds=${2:-3}
[ -f "$tar" ] || { echo "no root tarball: pass one, or build recipes/debian-12-minimal.toml first" >&2; exit 2; }
baseline="bash benches/shell-baseline.sh"

cargo build --release -q
kiln=${CARGO_TARGET_DIR:-target}/release/kiln
work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX); trap 'rm -rf "$work"' EXIT
cat > "$work/recipe.toml" <<TOML
[image]
name = "bench"
arch = "x86_64"
size = "2GiB"
base = { tarball = "$tar" }

[[files]]
path = "/etc/motd"
content = "bench\n"
TOML

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# wall seconds, peak RSS KiB, user seconds, system seconds
t() { /usr/bin/time -f "%e %M %U %S" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }; cat "$work/time"; }

echo "root tarball: $tar ($(du -h "$tar" | cut -f1))"
: > "$work/k"; : > "$work/b"
for i in $(seq "$rounds"); do
  rm -rf "$work/out" "$work/base.raw"*; sync
  read -r bs bm bu bsys < <(t $baseline "$tar" "$work/base.raw" 2048)
  sync
  read -r ks km ku ksys < <(t env SOURCE_DATE_EPOCH=1700000000 "$kiln" build "$work/recipe.toml" --out "$work/out" -q)
  echo "round $i: baseline ${bs}s (user ${bu}s, sys ${bsys}s, ${bm} KiB RSS)  kiln ${ks}s (user ${ku}s, sys ${ksys}s, ${km} KiB RSS)"
  echo "$bs" >> "$work/b"; echo "$ks" >> "$work/k"
done
b=$(median < "$work/b"); k=$(median < "$work/k")
echo "median: baseline ${b}s, kiln ${k}s, kiln is $(awk -v b="$b" -v k="$k" 'BEGIN{printf "%.1f", b/k}')x faster"

# Rebuild after changing one file: the staged base is reused, only assembly runs again.
sed -i 's/content = "bench\\n"/content = "bench, changed\\n"/' "$work/recipe.toml"
read -r rs _ ru rsys < <(t env SOURCE_DATE_EPOCH=1700000000 "$kiln" build "$work/recipe.toml" --out "$work/out" -q)
echo "rebuild after one file changed: ${rs}s (user ${ru}s, sys ${rsys}s)"

# The floor of this machine for the same work, each part measured alone: reading the tarball
# (page cache warm, as in the rounds), writing the image's data bytes, one SHA-256 pass over
# the whole image (openssl, which uses the CPU's SHA instructions as kiln does; coreutils'
# sha256sum does not). kiln overlaps them on two cores, so it can come in under their sum.
img="$work/out/bench-x86_64.raw"
data_mib=$(( $(du -k "$img" | cut -f1) / 1024 ))
sync
read -r fr _ < <(t cat "$tar")
sync
read -r fw _ < <(t dd if=/dev/zero of="$work/floor.bin" bs=1M count="$data_mib" status=none)
rm -f "$work/floor.bin"; sync
# The first read after writeback costs extent lookups kiln never makes (it hashes as it
# writes): warm the page cache first, as the tarball is warm in the rounds.
openssl dgst -sha256 "$img" >/dev/null
read -r fh _ < <(t openssl dgst -sha256 "$img")
floor=$(awk -v a="$fr" -v b="$fw" -v c="$fh" 'BEGIN{printf "%.2f", a+b+c}')
echo "floor: read tarball ${fr}s + write ${data_mib} MiB ${fw}s + sha256 of the image ${fh}s = ${floor}s; kiln median ${k}s is $(awk -v f="$floor" -v k="$k" 'BEGIN{printf "%.1f", k/f}')x the floor"
