#!/bin/bash
# The issue-16 benchmark: bench ab's false alarms (A/A) and its detection of real slowdowns,
# on this 2-core machine with a second process keeping one core busy.
#   CODE=<checkout to run> PY=<interpreter with torch> bash campaign.sh
# Writes one folder per ab invocation beside this script, and campaign.log.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
CODE=${CODE:-$(cd "$HERE/../.." && pwd)}
PY=${PY:-python}
LOG=$HERE/campaign.log
export BENCH_TEST_ENTRIES=1 PYTHONPATH=$CODE
cd "$CODE"
python3 -c "while True: pass" &        # the second process: one core busy throughout
BUSY=$!
trap 'kill $BUSY' EXIT
ab() {  # name, then ab's arguments
  local name=$1; shift
  echo "== $name $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$LOG"
  "$PY" -m bench ab --base "$PY" --new "$PY" --threads 1 --out "$HERE/$name" "$@" \
      > "$HERE/$name.out" 2> "$HERE/$name.err"
  echo "   exit $? $(tail -1 "$HERE/$name.out")" >> "$LOG"
}
SLOW="--preset quick --frameworks numpy-slowed --models lstm --strategies loop --max-rounds 12"
for i in $(seq 1 10); do
  for s in 0.05 0.10; do
    ab "slowed-$s-$i" $SLOW --new-env BENCH_SLOWDOWN=$s
  done
  if [ $i -le 5 ]; then ab "aa-numpy-$i" $SLOW; fi
done
for i in $(seq 1 10); do
  ab "aa-torch-$i" --preset quick --frameworks torch --models lstm treelstm \
     --strategies fused levels --rounds 8 --max-rounds 8
done
for i in $(seq 1 5); do
  for s in 0.03 0.02; do
    ab "slowed-$s-$i" $SLOW --new-env BENCH_SLOWDOWN=$s
  done
done
echo "== done $(date -u +%H:%M:%S)" >> "$LOG"
