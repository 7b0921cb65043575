#!/usr/bin/env bash
# The nightly case of a team's own service, side by side in one run:
#   cold:    kiln build recipes/hello-service.toml with an empty cache (Debian's base staged
#            with mmdebstrap, then the service layer, then assembly), as on a fresh CI runner;
#   rebuild: the same recipe after only the service's .deb changed (a new version built by
#            recipes/hello-service/build-deb.sh), with the base cached: the service layer is
#            staged again on it, Debian's base is not.
# Each round builds cold into a fresh cache, then rebuilds with a new .deb; medians of wall,
# user and system time; `sync` before each side. Needs the network the recipe's mirror needs.
#
# Usage: benches/service.sh [ROUNDS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}

cargo build --release -q
kiln=$(realpath "${CARGO_TARGET_DIR:-target}/release/kiln")
work=$(mktemp -d /var/tmp/kiln-bench-service.XXXXXX); trap 'rm -rf "$work"' EXIT
# A copy of the recipes, so a new .deb does not touch the checkout.
cp -a recipes "$work/recipes"
rm -rf "$work/recipes/hello-service/dist"

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# wall seconds, user seconds, system seconds
t() { /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }; cat "$work/time"; }
build() { t env SOURCE_DATE_EPOCH=1700000000 KILN_CACHE_DIR="$1" "$kiln" build "$work/recipes/hello-service.toml" --out "$work/out"; }

for f in cw cu cs rw ru rs; do : > "$work/$f"; done
version=0
for i in $(seq "$rounds"); do
  version=$((version + 1))
  "$work/recipes/hello-service/build-deb.sh" "1.0.$version" >/dev/null
  rm -rf "$work/cache" "$work/out"; sync
  read -r cw cu cs < <(build "$work/cache")
  grep -q "staging bookworm" "$work/err" || { echo "the cold build did not stage the base" >&2; exit 1; }
  version=$((version + 1))
  "$work/recipes/hello-service/build-deb.sh" "1.0.$version" >/dev/null
  sync
  read -r rw ru rs < <(build "$work/cache")
  if grep -q "staging bookworm" "$work/err"; then echo "the rebuild staged the Debian base again" >&2; exit 1; fi
  grep -q "staging the service layer" "$work/err" || { echo "the rebuild did not stage the layer" >&2; exit 1; }
  echo "round $i: cold ${cw}s (user ${cu}s, sys ${cs}s)  rebuild after a new .deb ${rw}s (user ${ru}s, sys ${rs}s)"
  echo "$cw" >> "$work/cw"; echo "$cu" >> "$work/cu"; echo "$cs" >> "$work/cs"
  echo "$rw" >> "$work/rw"; echo "$ru" >> "$work/ru"; echo "$rs" >> "$work/rs"
done
cw=$(median < "$work/cw"); rw=$(median < "$work/rw")
echo "median: cold ${cw}s (user $(median < "$work/cu")s, sys $(median < "$work/cs")s), rebuild after a new .deb ${rw}s (user $(median < "$work/ru")s, sys $(median < "$work/rs")s): $(awk -v c="$cw" -v r="$rw" 'BEGIN{printf "%.1f", c/r}')x faster, the Debian base not re-staged"
