#!/usr/bin/env bash
# kiln publish vs coldsnap upload, side by side against the same moto server and image.
#
#   benches/publish.sh [MANIFEST.json] [ROUNDS]
#   benches/publish.sh --nightly [ROUNDS] [ROOTFS.tar]
#
# --nightly: last night's and tonight's build of a 4 GiB image from the same staged root
# (ROOTFS.tar, default the newest staged Debian 12 base in the cache), differing in one recipe
# file. Three sides per round, each on a fresh moto server, order rotating: `kiln publish` of
# tonight's image after last night's was published (incremental: the parent snapshot and only
# the changed blocks), `kiln publish --full` of tonight's image, and `coldsnap upload
# --omit-zero-blocks --wait` of it. Reports blocks and bytes sent, wall, user and system time.
#
# Without an argument a 256 MiB test image with data in ~40% of its blocks (scattered) is made
# with its manifest. Needs .ci/setup-moto; installs coldsnap with cargo into the cache (only here,
# never in CI). Reports wall, user and system time of each (medians, `sync` before each side),
# the ratio, and the blocks each sent (counted by moto's ListSnapshotBlocks on the resulting
# snapshots). Each tool gets a fresh moto server per round, so kiln cannot reuse what an earlier
# round uploaded; the order alternates between rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${KILN_CACHE_DIR:-/var/cache/kiln}"
./.ci/setup-moto >/dev/null
venv="$cache/moto-venv"
if [ ! -x "$cache/coldsnap/bin/coldsnap" ]; then
  cargo install coldsnap --locked --root "$cache/coldsnap"
fi
coldsnap="$cache/coldsnap/bin/coldsnap"
cargo build --release --bin kiln
kiln="${CARGO_TARGET_DIR:-target}/release/kiln"

work="$(mktemp -d)"
moto=""
trap '[ -n "$moto" ] && kill $moto 2>/dev/null; rm -rf "$work"' EXIT
start_moto() {
  port="$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
  moto=$!
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
  url="$AWS_ENDPOINT_URL"
}
stop_moto() { kill "$moto" 2>/dev/null; wait "$moto" 2>/dev/null || true; moto=""; }
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
venv_py="$venv/bin/python"
rounds="${2:-3}"

count_blocks() {
  "$venv/bin/python" - "$url" "$1" <<'PY'
import boto3, sys
ebs = boto3.client("ebs", endpoint_url=sys.argv[1], region_name="us-east-1")
n = 0; tok = None
while True:
    kw = {"SnapshotId": sys.argv[2]} | ({"NextToken": tok} if tok else {})
    r = ebs.list_snapshot_blocks(**kw); n += len(r["Blocks"]); tok = r.get("NextToken")
    if not tok: break
print(n)
PY
}

if [ "${1:-}" = "--nightly" ]; then
  rounds="${2:-3}"
  tar="${3:-$(ls -t "$cache"/bases/bookworm-amd64-*.tar 2>/dev/null | head -1)}"
  [ -f "$tar" ] || { echo "no root tarball: pass one, or build recipes/debian-12-minimal.toml first" >&2; exit 2; }
  for night in 1 2; do
    cat >"$work/night$night.toml" <<TOML
[image]
name = "nightly"
arch = "x86_64"
size = "4GiB"
base = { tarball = "$tar" }

[[files]]
path = "/etc/motd"
content = "build of night $night\n"

[ami]
name = "nightly-{sha}"
regions = ["us-east-1"]
TOML
    SOURCE_DATE_EPOCH=1700000000 "$kiln" build "$work/night$night.toml" --out "$work/night$night" -q 2>/dev/null
  done
  m1="$work/night1/nightly-x86_64.manifest.json"; m2="$work/night2/nightly-x86_64.manifest.json"
  changed="$("$venv_py" - "$m1" "$m2" <<'PY'
import json, sys
a, b = ({d["index"]: d["sha256"] for d in json.load(open(p))["blocks"]["data_blocks"]} for p in sys.argv[1:])
print(len(b), sum(1 for i in set(a) | set(b) if a.get(i) != b.get(i)))
PY
)"
  echo "image: 4 GiB, $(echo "$changed" | cut -d' ' -f1) data blocks; blocks that differ from last night's: $(echo "$changed" | cut -d' ' -f2)"
  # wall user sys
  timed() { /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" >"$work/out.json" 2>"$work/err" || { cat "$work/err" >&2; exit 1; }; cat "$work/time"; }
  field() { "$venv_py" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$work/out.json" "$1"; }
  : >"$work/nightly"
  side_incremental() {
    start_moto; rm -rf "$work/state"
    KILN_STATE_DIR="$work/state" "$kiln" publish --json "$m1" >/dev/null 2>&1
    sync
    read -r w u s < <(KILN_STATE_DIR="$work/state" timed "$kiln" publish --json "$m2")
    echo "incremental $w $u $s $(field blocks_sent) $(field bytes_sent) $(field blocks_inherited)" >>"$work/nightly"
    stop_moto
  }
  side_full() {
    start_moto; rm -rf "$work/state"; sync
    read -r w u s < <(KILN_STATE_DIR="$work/state" timed "$kiln" publish --json --full "$m2")
    echo "full $w $u $s $(field blocks_sent) $(field bytes_sent) 0" >>"$work/nightly"
    stop_moto
  }
  side_coldsnap() {
    start_moto; sync
    read -r w u s < <(timed "$coldsnap" upload --no-progress --omit-zero-blocks --wait "$work/night2/nightly-x86_64.raw")
    local snap; snap="$(grep -o 'snap-[0-9a-f]*' "$work/out.json" | head -1)"
    local n; n="$(count_blocks "$snap")"
    echo "coldsnap $w $u $s $n $((n * 524288)) 0" >>"$work/nightly"
    stop_moto
  }
  sides=(side_incremental side_full side_coldsnap)
  for r in $(seq "$rounds"); do
    for k in 0 1 2; do "${sides[$(((r + k) % 3))]}"; done
  done
  cat "$work/nightly" >&2
  "$venv_py" - "$work/nightly" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = lambda k, i: statistics.median(float(r[i]) for r in rows if r[0] == k)
label = {"incremental": "kiln publish (tonight, parent = last night)", "full": "kiln publish --full", "coldsnap": "coldsnap upload --omit-zero-blocks --wait"}
for k in ("incremental", "full", "coldsnap"):
    r = next(r for r in rows if r[0] == k)
    print(f"{label[k]:44} median {med(k, 1):6.2f} s (user {med(k, 2):.2f} s, sys {med(k, 3):.2f} s), "
          f"{int(r[4])} blocks sent ({int(r[5]) / 1048576:.1f} MiB), {int(r[6])} inherited")
inc = med("incremental", 1)
print(f"nightly publish vs full: {med('full', 1) / inc:.1f}x faster; vs coldsnap: {med('coldsnap', 1) / inc:.1f}x faster")
PY
  exit 0
fi

manifest="${1:-}"
if [ -z "$manifest" ]; then
  manifest="$work/bench.manifest.json"
  "$venv/bin/python" - "$work" <<'PY'
import hashlib, json, os, random, sys
work = sys.argv[1]; bs = 524288; nblocks = 512  # 256 MiB
rng = random.Random(7)
data = sorted(rng.sample(range(nblocks), nblocks * 2 // 5))
raw = os.path.join(work, "bench.raw"); whole = hashlib.sha256(); blocks = []
with open(raw, "wb") as f:
    f.truncate(nblocks * bs)
    for i in range(nblocks):
        b = rng.randbytes(bs) if i in set(data) else bytes(bs)
        if i in data:
            f.seek(i * bs); f.write(b); blocks.append({"index": i, "sha256": hashlib.sha256(b).hexdigest()})
        whole.update(b)
ami = {"name": "bench-{sha}", "regions": ["us-east-1"], "root_volume": {"device": "/dev/xvda", "size_gib": 1, "volume_type": "gp3", "delete_on_termination": True},
       "ena": True, "sriov": False, "tpm": False, "boot_mode": "uefi", "launch_permissions": {"accounts": [], "organizations": [], "organizational_units": [], "public": False},
       "tags": {}, "volumes": [], "encrypted": False}
m = {"manifest_version": 1, "kiln_version": "bench", "name": "bench", "recipe": {"path": "bench.toml", "sha256": "0" * 64}, "os": "debian-12", "arch": "x86_64", "boot": "uefi",
     "source_date_epoch": 0, "packages": [], "image": {"file": "bench.raw", "size_bytes": nblocks * bs, "sha256": whole.hexdigest()},
     "disk": {"label": "gpt", "guid": "00000000-0000-0000-0000-000000000000", "sector_size": 512, "partitions": []},
     "blocks": {"block_size": bs, "data_blocks": blocks}, "ami": ami}
json.dump(m, open(os.path.join(work, "bench.manifest.json"), "w"))
PY
fi
raw="$(dirname "$manifest")/$("$venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["image"]["file"])' "$manifest")"


# Wall, user and system time of a command; its stdout goes to the first argument.
timed_to() { local out=$1; shift; /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" >"$out"; cat "$work/time"; }
run_kiln() {
  start_moto
  # A fresh state directory too: each round is a first publish, like coldsnap's.
  rm -rf "$work/state"; sync
  local w u s
  read -r w u s < <(KILN_STATE_DIR="$work/state" timed_to "$work/kiln.json" "$kiln" publish --json "$manifest")
  local snap; snap="$("$venv_py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot_id"])' "$work/kiln.json")"
  echo "kiln $w $u $s $(count_blocks "$snap")" >>"$work/results"
  stop_moto
}
run_coldsnap() {
  start_moto; sync
  local w u s
  read -r w u s < <(timed_to "$work/coldsnap.out" "$coldsnap" upload --no-progress --omit-zero-blocks --wait "$raw")
  local snap; snap="$(grep -o 'snap-[0-9a-f]*' "$work/coldsnap.out" | head -1)"
  echo "coldsnap $w $u $s $(count_blocks "$snap")" >>"$work/results"
  stop_moto
}
for r in $(seq "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then run_kiln; run_coldsnap; else run_coldsnap; run_kiln; fi
done
cat "$work/results" >&2
"$venv_py" - "$work/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = lambda k, i: statistics.median(float(r[i]) for r in rows if r[0] == k)
n = lambda k: sum(1 for r in rows if r[0] == k)
b = {k: sorted({int(r[4]) for r in rows if r[0] == k}) for k in ("kiln", "coldsnap")}
k, c = med("kiln", 1), med("coldsnap", 1)
print(f"kiln publish (upload, wait, register): median {k:.2f} s (user {med('kiln', 2):.2f} s, sys {med('kiln', 3):.2f} s) over {n('kiln')} rounds, blocks {b['kiln']}")
print(f"coldsnap upload --wait:                median {c:.2f} s (user {med('coldsnap', 2):.2f} s, sys {med('coldsnap', 3):.2f} s) over {n('coldsnap')} rounds, blocks {b['coldsnap']}")
print(f"ratio coldsnap/kiln: {c / k:.2f}x")
PY
