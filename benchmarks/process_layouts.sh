#!/usr/bin/env bash
# Wall time of the single-edit protocol on the same records in each way of laying the work out on
# a CPU's cores, one after another, the first repeated at the end to show the machine's drift:
#   a1, a2  one process, all threads, 16 edits trained together
#   b       2 worker processes (the threads split), one edit after another
#   c       2 worker processes, 16 edits trained together in each
#   d       2 worker processes, 8 edits trained together in each
#
#   benchmarks/process_layouts.sh OUT INDICES [BASELINES] [-- extra icelora eval arguments]
#   benchmarks/process_layouts.sh /tmp/layouts 1000:1032 \
#       benchmarks/results/zsre-ice-all-frozen-bf16/ice-lora/baselines.jsonl -- --config configs/ice-lora-frozen-bf16.yaml
#
# BASELINES (a baselines.jsonl of an earlier run with the same seed) is copied into each run folder
# first, so no layout spends time on the unedited baselines. Each run's folder is OUT/NAME (its
# log beside its cases in OUT/NAME/log); OUT/times.txt gets one line per run: name, wall seconds,
# exit status, arguments.
set -euo pipefail
out=${1:?usage: process_layouts.sh OUT INDICES [BASELINES] [-- icelora eval arguments]}
indices=${2:?usage: process_layouts.sh OUT INDICES [BASELINES] [-- icelora eval arguments]}
shift 2
baselines=""
if [[ $# -gt 0 && $1 != "--" ]]; then baselines=$1; shift; fi
if [[ $# -gt 0 && $1 == "--" ]]; then shift; fi
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"

run() {
    local name=$1; shift
    local folder="$out/$name"
    rm -rf "$folder"; mkdir -p "$folder"
    if [[ -n $baselines ]]; then cp "$baselines" "$folder/baselines.jsonl"; fi
    local start end status=0
    start=$(date +%s.%N)
    "$here/.venv/bin/icelora" eval --protocol single --dataset zsre-ice --indices "$indices" \
        --output "$folder" --resume -q "$@" > "$folder/log" 2>&1 || status=$?
    end=$(date +%s.%N)
    echo "$name $(awk "BEGIN {print $end - $start}") rc=$status $*" >> "$out/times.txt"
}

run a1 --edits-at-once 16 --train-together yes "$@"
run b --edits-at-once 16 --train-together no --workers 2 "$@"
run c --edits-at-once 16 --train-together yes --workers 2 "$@"
run d --edits-at-once 8 --train-together yes --workers 2 "$@"
run a2 --edits-at-once 16 --train-together yes "$@"
