#!/usr/bin/env bash
# A CI fleet's two costs, side by side in one run, for recipes/debian-12-ec2.toml per
# architecture:
#   cold:   kiln build with an empty cache and no shared cache (a fresh runner, alone);
#   shared: a second fresh runner's build with KILN_CACHE_URL pointing at a moto S3 bucket the
#           first runner filled: the base is downloaded and verified, mmdebstrap does not run.
# and, for the staging alone (the slowest part of any cold build, above all for arm64 under
# qemu-user), mmdebstrap with kiln's exact arguments (captured from the cold build) with and
# without the hooks kiln adds for speed:
#   staging before: without them (kiln's staging until 2026-12-07: dpkg with fsync, and the
#                   initramfs built twice, by the kernel's postinst and again by its trigger);
#   staging after:  with them (eatmydata, one initramfs at the end). Neither side uses the
#                   host's tools in a foreign chroot: benches/cold.sh --arm64 measures those.
# Medians of wall, user and system time over ROUNDS; `sync` before each side. Needs the
# network the recipe's mirror needs, .ci/setup-moto, and qemu-user-static for arm64.
#
# Usage: benches/fleet.sh [ARCHS] [ROUNDS]   (default "x86_64 arm64", 1: an arm64 staging
#        takes many minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
archs=${1:-"x86_64 arm64"}
rounds=${2:-1}
cache="${KILN_CACHE_DIR:-/var/cache/kiln}"
./.ci/setup-moto >/dev/null
venv="$cache/moto-venv"
cargo build --release -q --bin kiln
kiln=$(realpath "${CARGO_TARGET_DIR:-target}/release/kiln")
work=$(mktemp -d /var/tmp/kiln-bench-fleet.XXXXXX)
moto=""
trap '[ -n "$moto" ] && kill $moto 2>/dev/null; rm -rf "$work"' EXIT

port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
unset SOURCE_DATE_EPOCH KILN_STATE_URL
"$venv/bin/python" -c "import boto3; boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL').create_bucket(Bucket='kiln-bench')"

. benches/lib.sh
# kiln's mmdebstrap, wrapped to keep the arguments of the staging.
wrap_mmdebstrap "$work"
# wall seconds, user seconds, system seconds (children included)
t() { /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" >"$work/out.json" 2>"$work/err" || { cat "$work/err" >&2; exit 1; }; cat "$work/time"; }
build() { # CACHE ARCH [URL]
  t env PATH="$work/bin:$PATH" KILN_CACHE_DIR="$1" ${3:+KILN_CACHE_URL=$3} "$kiln" build recipes/debian-12-ec2.toml \
    --arch "$2" --out "$work/out" --json
}
from() { "$venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_origin"]["from"])' "$work/out.json"; }
sha() { "$venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$work/out.json"; }
stage() { # with|without kiln's speed hooks
  mapfile -t args < "$work/staging-args"
  # The host's tools in a foreign chroot (stage/debian/native.rs) are prepared by kiln for one
  # staging and cannot be replayed: both sides stage without them.
  local own=()
  for a in "${args[@]}"; do case "$a" in *native-tools.*) ;; *) own+=("$a") ;; esac; done
  args=("${own[@]}")
  if [ "$1" = without ]; then
    local kept=()
    for a in "${args[@]}"; do
      case "$a" in
        --hook-dir=*eatmydata | --essential-hook=*update-initramfs* | --customize-hook=*update-initramfs*) ;;
        --customize-hook=*ldconfig) ;;
        *) kept+=("$a") ;;
      esac
    done
    args=("${kept[@]}")
  fi
  # The target (the .tar.partial kiln names) goes to the work directory instead.
  for i in "${!args[@]}"; do [[ ${args[$i]} == *.tar.partial ]] && args[$i]="$work/staged.tar"; done
  t /usr/bin/mmdebstrap "${args[@]}"
  rm -f "$work/staged.tar"
}

for arch in $archs; do
  for f in cw cu cs sw su ss bw bu bs aw au as; do : > "$work/$arch.$f"; done
  for i in $(seq "$rounds"); do
    prefix="s3://kiln-bench/$arch-$i"
    rm -rf "$work/a" "$work/b" "$work/out"; sync
    read -r cw cu cs < <(build "$work/a" "$arch")
    [ "$(from)" = staged ] || { echo "the cold build did not stage" >&2; exit 1; }
    cold_sha=$(sha)
    grep -q -- '--hook-dir=.*eatmydata' "$work/staging-args" || echo "note: kiln staged without the eatmydata hook" >&2
    grep -q -- '--essential-hook=.*update-initramfs' "$work/staging-args" || { echo "kiln's staging has no initramfs hook" >&2; exit 1; }
    # Runner A shares its base (not timed: it is the cold runner's last step on a fleet).
    build "$work/a" "$arch" "$prefix" >/dev/null
    rm -rf "$work/out"; sync
    read -r sw su ss < <(build "$work/b" "$arch" "$prefix")
    [ "$(from)" = shared ] || { echo "the second runner did not use the shared base" >&2; exit 1; }
    [ "$(sha)" = "$cold_sha" ] || { echo "the second runner built other bytes" >&2; exit 1; }
    sync; read -r bw bu bs < <(stage without)
    sync; read -r aw au as < <(stage with)
    echo "$arch round $i: cold ${cw}s (user ${cu}s, sys ${cs}s)  shared ${sw}s (user ${su}s, sys ${ss}s)  staging as before ${bw}s (user ${bu}s, sys ${bs}s)  as now ${aw}s (user ${au}s, sys ${as}s)"
    for f in cw cu cs sw su ss bw bu bs aw au as; do echo "${!f}" >> "$work/$arch.$f"; done
  done
  m() { median < "$work/$arch.$1"; }
  echo "$arch median: cold $(m cw)s (user $(m cu)s, sys $(m cs)s), second runner from the shared cache $(m sw)s (user $(m su)s, sys $(m ss)s): $(awk -v c="$(m cw)" -v s="$(m sw)" 'BEGIN{printf "%.1f", c/s}')x; staging as before $(m bw)s (user $(m bu)s, sys $(m bs)s), as now $(m aw)s (user $(m au)s, sys $(m as)s): $(awk -v b="$(m bw)" -v a="$(m aw)" 'BEGIN{printf "%.2f", b/a}')x"
done
