#!/usr/bin/env bash
# The full single-edit ZsRE benchmark (all 1301 `zsre-ice` records, every metric) with one method,
# resumable: run it again after an interruption and it continues where it stopped. Each run of this
# script is one segment; it appends its start, end, exit status, wall seconds and the number of
# finished cases to OUT/../segments.log, so the benchmark's wall time is the sum of the segments'.
#   benchmarks/full_zsre_benchmark.sh OUT [extra icelora eval flags]
#   benchmarks/full_zsre_benchmark.sh benchmarks/results/zsre-ice-all/ice-lora --method ice-lora
set -u
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT [extra icelora eval flags]" >&2
    exit 2
fi
OUT=$1
shift
ICELORA=${ICELORA:-.venv/bin/icelora}
LOG=$(dirname "$OUT")/segments.log
mkdir -p "$(dirname "$OUT")"
count() { if [ -f "$OUT/cases.jsonl" ]; then wc -l < "$OUT/cases.jsonl"; else echo 0; fi; }
start=$(date +%s)
echo "start $(date -u +%FT%TZ) cases_done=$(count) cmd: $ICELORA eval --protocol single --dataset zsre-ice --edits-at-once 16 --output $OUT --resume -q $*" >> "$LOG"
"$ICELORA" eval --protocol single --dataset zsre-ice --edits-at-once 16 --output "$OUT" --resume -q "$@"
rc=$?
echo "end   $(date -u +%FT%TZ) rc=$rc seconds=$(( $(date +%s) - start )) cases_done=$(count)" >> "$LOG"
exit $rc
