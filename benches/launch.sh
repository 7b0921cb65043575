#!/usr/bin/env bash
# kiln test timing: power-on -> SSH login -> cloud-init done -> all checks done, per launch,
# under QEMU's TCG on this machine. There is no other tool that launches an image as EC2 does
# on the build host, so the figures stand alone; the point is the margin between the guest's
# own boot (SSH, cloud-init) and the end of kiln's checks.
#
# Usage: benches/launch.sh IMAGE.raw [ROUNDS]
#   IMAGE.raw: e.g. out/debian-12-ec2-x86_64.raw (kiln build recipes/debian-12-ec2.toml first).
#   ROUNDS defaults to 3; each round is one launch. Prints each round and the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: benches/launch.sh IMAGE.raw [ROUNDS]}
rounds=${2:-3}
# The guest's emulated boot is the whole cost; kiln's own work is SSH and a report, so the dev
# build (shared with the tests) measures the same as a release build would.
cargo build -q
kiln=${CARGO_TARGET_DIR:-target}/debug/kiln
work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX); trap 'rm -rf "$work"' EXIT
for r in $(seq "$rounds"); do
  sync
  /usr/bin/time -f '%e %U %S' -o "$work/time.$r" "$kiln" test "$image" --json > "$work/report.$r.json"
  python3 - "$work/report.$r.json" "$work/time.$r" "$r" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1])); wall, user, sys_ = open(sys.argv[2]).read().split()
t = rep["launches"][0]["timings"]
print(f"round {sys.argv[3]}: ssh {t['ssh_secs']:.1f} s, cloud-init done {t['cloud_init_done_secs'] or 0:.1f} s, "
      f"checks done {t['checks_done_secs']:.1f} s; kiln test wall {wall} s (user {user} s, sys {sys_} s); passed={rep['passed']}")
PY
done
python3 - "$work" "$rounds" <<'PY'
import json, statistics, sys
w, n = sys.argv[1], int(sys.argv[2])
reps = [json.load(open(f"{w}/report.{r}.json"))["launches"][0]["timings"] for r in range(1, n + 1)]
walls = [float(open(f"{w}/time.{r}").read().split()[0]) for r in range(1, n + 1)]
med = lambda k: statistics.median(x[k] or 0 for x in reps)
print(f"median of {n}: power-on -> ssh {med('ssh_secs'):.1f} s -> cloud-init done {med('cloud_init_done_secs'):.1f} s "
      f"-> checks done {med('checks_done_secs'):.1f} s; kiln test wall {statistics.median(walls):.1f} s; "
      f"checks after cloud-init: {med('checks_done_secs') - med('cloud_init_done_secs'):.1f} s")
PY
