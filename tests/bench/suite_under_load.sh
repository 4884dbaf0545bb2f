#!/usr/bin/env bash
# The whole test suite (`make test`, what .ci/run calls) on a fresh clone, RUNS times in a row, with a CPU burner
# (a Python busy loop) holding one core the whole time: the timed tests must not depend on an idle machine
# (issue 18). Prints one line per run (exit status, seconds, load average) and each pytest process's summary; the
# full logs are left in WORKDIR.
#
# Usage:  bash tests/bench/suite_under_load.sh [REPO (default: this checkout)] [RUNS (default: 2)]
#         WORKDIR=/tmp/taxonet-under-load  (where the clone and the logs go)
set -u
repo=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
runs=${2:-2}
workdir=${WORKDIR:-/tmp/taxonet-under-load}
mkdir -p "$workdir"
rm -rf "$workdir/clone"
git clone -q "$repo" "$workdir/clone" || exit 2
cd "$workdir/clone" || exit 2
echo "commit $(git rev-parse --short HEAD), $(nproc) cores, start $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 -c 'while True: pass' &
burner=$!
trap 'kill $burner 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  make test PYTEST_ARGS="-q -p no:cacheprovider --durations=10" > "$workdir/make-test-$i.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=1
  echo "run $i: exit $rc, $(( $(date +%s) - start )) s, end $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
  grep -E "^[0-9]+ (passed|failed|errors?|skipped)[ ,]" "$workdir/make-test-$i.log" | sed 's/^/  /'
done
exit $failed
