#!/usr/bin/env bash
# Instance-store bundle benchmark, side by side in one run on the same raw image:
#   kiln bundle IMAGE                                        (one pass, compression on every core)
#   tar -cS | gzip -9 | openssl enc -aes-128-cbc | split -b 10M  (the reference pipeline)
# kiln runs at its default gzip level (6) and at --level 9 (the reference's level); both are
# checked to round-trip (kiln unbundle). Reports wall, user and system times (medians, `sync`
# before each side), ratios, sizes and peak RSS.
#
# Usage: benches/bundle.sh [IMAGE.raw] [ROUNDS]
#   IMAGE defaults to out/debian-12-minimal-x86_64.raw (build it with the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
img=$(realpath "${1:-out/debian-12-minimal-x86_64.raw}")
rounds=${2:-3}
[ -f "$img" ] || { echo "no image $img: pass one, or run kiln build recipes/debian-12-minimal.toml first" >&2; exit 2; }
cargo build --release -q
kiln=$(realpath "${CARGO_TARGET_DIR:-target}/release/kiln")
work=$(mktemp -d /var/tmp/kiln-bundle-bench.XXXXXX); trap 'rm -rf "$work"' EXIT
# Throwaway keys, made here and deleted with the work directory.
for who in user ec2; do
  openssl genrsa -out "$work/$who-pk.pem" 2048 2>/dev/null
  openssl req -new -x509 -days 1 -subj "/CN=kiln-bench" -key "$work/$who-pk.pem" -out "$work/$who-cert.pem"
done
key=$(openssl rand -hex 16); iv=$(openssl rand -hex 16)
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
timed() { local out=$1; shift; /usr/bin/time -f "%e %M %U %S" -o "$out" "$@"; }
: > "$work/r"; : > "$work/k6"; : > "$work/k9"; : > "$work/m"; : > "$work/cpu"
echo "image: $img ($(du -h --apparent-size "$img" | cut -f1) apparent, $(du -h "$img" | cut -f1) allocated), $(nproc) cores"
kb() {
  rm -rf "$work/k"; timed "$work/t" "$kiln" bundle "$img" --account 123456789012 --user-cert "$work/user-cert.pem" \
    --user-key "$work/user-pk.pem" --ec2-cert "$work/ec2-cert.pem" -o "$work/k" --name bench "$@" 2>/dev/null >/dev/null
}
for i in $(seq "$rounds"); do
  rm -rf "$work/ref"; mkdir "$work/ref"; sync
  timed "$work/t" bash -c "tar -cSf - -C '$(dirname "$img")' '$(basename "$img")' | gzip -9 \
    | openssl enc -aes-128-cbc -K $key -iv $iv | split -b 10M - '$work/ref/bench.part.'"
  read -r rs _ ru rsys < "$work/t"; rsize=$(du -cb "$work"/ref/bench.part.* | tail -1 | cut -f1)
  sync; kb; read -r k6 m6 k6u k6s < "$work/t"; k6size=$(du -cb "$work"/k/bench.part.* | tail -1 | cut -f1)
  sync; kb --level 9; read -r k9 m9 k9u k9s < "$work/t"; k9size=$(du -cb "$work"/k/bench.part.* | tail -1 | cut -f1)
  if [ "$i" = 1 ]; then
    "$kiln" unbundle "$work/k/bench.manifest.xml" --user-key "$work/user-pk.pem" -o "$work/back.raw" >/dev/null 2>&1
    cmp "$img" "$work/back.raw" && rm "$work/back.raw"
  fi
  echo "round $i: reference ${rs}s (user ${ru}s, sys ${rsys}s; $((rsize >> 20)) MiB)   kiln ${k6}s (user ${k6u}s, sys ${k6s}s; $((k6size >> 20)) MiB, RSS $((m6 / 1024)) MiB)   kiln --level 9 ${k9}s (user ${k9u}s, sys ${k9s}s; $((k9size >> 20)) MiB, RSS $((m9 / 1024)) MiB)"
  echo "r $ru $rsys" >> "$work/cpu"; echo "k6 $k6u $k6s" >> "$work/cpu"; echo "k9 $k9u $k9s" >> "$work/cpu"
  echo "$rs" >> "$work/r"; echo "$k6" >> "$work/k6"; echo "$k9" >> "$work/k9"; echo "$m6" >> "$work/m"; echo "$m9" >> "$work/m"
done
r=$(median < "$work/r"); k6=$(median < "$work/k6"); k9=$(median < "$work/k9"); m=$(sort -n "$work/m" | tail -1)
cpu() { col() { awk -v k="$1" -v c="$2" '$1 == k {print $c}' "$work/cpu" | median; }; echo "user $(col "$1" 2)s, sys $(col "$1" 3)s"; }
ratio() { awk -v r="$1" -v k="$2" 'BEGIN{printf "%.1f", r/k}'; }
echo "median: reference ${r}s ($(cpu r)); kiln ${k6}s ($(cpu k6)) -> $(ratio "$r" "$k6")x faster; kiln --level 9 ${k9}s ($(cpu k9)) -> $(ratio "$r" "$k9")x faster; peak RSS $((m / 1024)) MiB; unbundle round trip identical"
