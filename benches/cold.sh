#!/usr/bin/env bash
# A cold build, what every fresh CI runner and every archive change pays, side by side in one
# run, each side with an empty cache and `sync` before it:
#   kiln        kiln build RECIPE with an empty KILN_CACHE_DIR (apt's resolution, the staging,
#               the disk image, its checksum and manifest);
#   mmdebstrap  plain mmdebstrap of the same package set from the same suites to a tarball:
#               the floor kiln's staging adds to (kiln's own hooks left out);
#   mkosi       mkosi building a bootable disk (systemd-boot) with the same packages, where
#               mkosi is installed (amd64 only). mkosi 24 is in bookworm-backports and needs the
#               host's bootctl, cpio and kmod:
#                 apt-get install -t bookworm-backports mkosi systemd-boot cpio kmod
#               It reads the main suite only (LocalMirror=), and builds its own default initrd.
# for recipes/debian-12-minimal.toml and recipes/debian-12-ec2.toml on amd64; with --arm64,
# also kiln's cold arm64 build of the EC2 recipe (mmdebstrap under qemu-user: minutes),
# compared by staging time (mmdebstrap's own "success in" figure) with the amd64 one, and the
# same build with every program in the chroot emulated (KILN_NATIVE_TOOLS=0, ten minutes).
# Medians of wall, user and system time (children included) over ROUNDS.
#
# Usage: benches/cold.sh [--arm64] [ROUNDS]   (ROUNDS defaults to 3; arm64 runs once)
# Needs root, the network the recipes' mirror needs (the build host's apt sources), and for
# arm64 qemu-user-static.
set -euo pipefail
cd "$(dirname "$0")/.."
arm64=no
if [ "${1:-}" = --arm64 ]; then arm64=yes; shift; fi
rounds=${1:-3}
cargo build --release -q --bin kiln
kiln=$(realpath "${CARGO_TARGET_DIR:-target}/release/kiln")
work=$(mktemp -d /var/tmp/kiln-bench-cold.XXXXXX)
trap 'rm -rf "$work"' EXIT
unset SOURCE_DATE_EPOCH KILN_CACHE_URL KILN_STATE_URL

. benches/lib.sh
# kiln's mmdebstrap, wrapped to keep the arguments of the staging.
wrap_mmdebstrap "$work"
# wall seconds, user seconds, system seconds (children included)
t() { /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" >"$work/out" 2>"$work/err" || { tail -30 "$work/err" >&2; exit 1; }; cat "$work/time"; }
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$work/out" "$1"; }

kiln_side() { # RECIPE ARCH [NAME=VALUE]
  rm -rf "$work/cache" "$work/out-img"; sync
  t env PATH="$work/bin:$PATH" KILN_CACHE_DIR="$work/cache" ${3:-} "$kiln" build "$1" --arch "$2" --out "$work/out-img" --json
  [ "$(json 'd["base_origin"]["from"]')" = staged ] || { echo "kiln did not stage $1 afresh" >&2; exit 1; }
  json 'd["sha256"]' > "$work/sha256"
  # mmdebstrap's own figure for the staging alone.
  grep -ho 'success in [0-9.]* seconds' "$work"/cache/bases/*.log | awk '{print $3}' > "$work/staging-secs"
}
# The package set and suites of kiln's last staging, without kiln's hooks.
plain_args() {
  mapfile -t args < "$work/staging-args"
  plain=()
  for a in "${args[@]}"; do
    case "$a" in
      --essential-hook=* | --customize-hook=* | --hook-dir=* | --skip=* | --aptopt=*) ;;
      *.tar.partial) plain+=("$work/plain.tar") ;;
      *) plain+=("$a") ;;
    esac
  done
}
mmdebstrap_side() {
  plain_args
  rm -f "$work/plain.tar"; sync
  t /usr/bin/mmdebstrap "${plain[@]}"
  rm -f "$work/plain.tar"
}
mkosi_side() {
  plain_args
  local suite="" mirror="" packages=""
  for a in "${plain[@]}"; do
    case "$a" in
      --include=*) packages=${a#--include=} ;;
      deb\ *) [ -n "$mirror" ] || { read -r _ mirror suite _ <<< "$a"; } ;;
    esac
  done
  rm -rf "$work/mkosi"; mkdir -p "$work/mkosi"
  cat > "$work/mkosi/mkosi.conf" <<EOF
[Distribution]
Distribution=debian
Release=$suite
Architecture=x86-64
LocalMirror=$mirror

[Output]
Format=disk
ImageId=cold

[Content]
Bootable=yes
Bootloader=systemd-boot
Packages=$packages
EOF
  sync
  t mkosi -C "$work/mkosi" -f build
  [ -s "$work/mkosi/cold.raw" ] || { echo "mkosi made no disk" >&2; exit 1; }
  rm -rf "$work/mkosi"
}
have_mkosi=no
command -v mkosi >/dev/null && have_mkosi=yes
[ $have_mkosi = yes ] || echo "mkosi is not installed: its side is skipped (see the comment at the top)" >&2

record() { for f in "$@"; do echo "${!f}" >> "$work/$f"; done; }
m() { median < "$work/$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
# Runs a side to the end (its failure stops the script), leaving its figures in $work/res.
side() { "$@" > "$work/res"; }

for i in $(seq "$rounds"); do
  side kiln_side recipes/debian-12-minimal.toml x86_64; read -r kmw kmu kms < "$work/res"
  kmst=$(cat "$work/staging-secs")
  side mmdebstrap_side; read -r pmw pmu pms < "$work/res"
  line="round $i minimal: kiln ${kmw}s (user ${kmu}s, sys ${kms}s; staging ${kmst}s)  mmdebstrap ${pmw}s (user ${pmu}s, sys ${pms}s)"
  record kmw kmu kms kmst pmw pmu pms
  if [ $have_mkosi = yes ]; then
    side mkosi_side; read -r xmw xmu xms < "$work/res"
    line="$line  mkosi ${xmw}s (user ${xmu}s, sys ${xms}s)"
    record xmw xmu xms
  fi
  echo "$line"
  side kiln_side recipes/debian-12-ec2.toml x86_64; read -r kew keu kes < "$work/res"
  kest=$(cat "$work/staging-secs")
  side mmdebstrap_side; read -r pew peu pes < "$work/res"
  echo "round $i ec2 amd64: kiln ${kew}s (user ${keu}s, sys ${kes}s; staging ${kest}s)  mmdebstrap ${pew}s (user ${peu}s, sys ${pes}s)"
  record kew keu kes kest pew peu pes
done

echo "median minimal amd64: kiln $(m kmw)s (user $(m kmu)s, sys $(m kms)s), plain mmdebstrap $(m pmw)s (user $(m pmu)s, sys $(m pms)s): kiln takes $(ratio "$(m kmw)" "$(m pmw)")x mmdebstrap's time"
if [ $have_mkosi = yes ]; then
  echo "median minimal amd64: mkosi $(m xmw)s (user $(m xmu)s, sys $(m xms)s): kiln is $(ratio "$(m xmw)" "$(m kmw)")x faster than mkosi"
fi
echo "median ec2 amd64: kiln $(m kew)s (user $(m keu)s, sys $(m kes)s; staging $(m kest)s), plain mmdebstrap $(m pew)s (user $(m peu)s, sys $(m pes)s): kiln takes $(ratio "$(m kew)" "$(m pew)")x mmdebstrap's time"

if [ $arm64 = yes ]; then
  side kiln_side recipes/debian-12-ec2.toml arm64; read -r kaw kau kas < "$work/res"
  kast=$(cat "$work/staging-secs") native_sha=$(cat "$work/sha256")
  echo "ec2 arm64: kiln ${kaw}s (user ${kau}s, sys ${kas}s; staging ${kast}s): its staging takes $(ratio "$kast" "$(m kest)")x the amd64 staging's time"
  # The same, every program in the chroot emulated (KILN_NATIVE_TOOLS=0).
  side kiln_side recipes/debian-12-ec2.toml arm64 KILN_NATIVE_TOOLS=0; read -r eaw eau eas < "$work/res"
  east=$(cat "$work/staging-secs") emulated_sha=$(cat "$work/sha256")
  echo "ec2 arm64, fully emulated: kiln ${eaw}s (user ${eau}s, sys ${eas}s; staging ${east}s): the host's tools make the staging $(ratio "$east" "$kast")x faster"
  if [ "$native_sha" = "$emulated_sha" ]; then
    echo "ec2 arm64: the same image both ways, sha256 $native_sha"
  else
    echo "ec2 arm64: OTHER BYTES: $native_sha with the host's tools, $emulated_sha emulated (did the archive change between them?)"
  fi
fi
