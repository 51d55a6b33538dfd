#!/usr/bin/env bash
# The CUDA speed tables: every configuration of benchmarks/edit_speed.py on one GPU, in order of
# importance, each under its own time limit so that one slow or failing configuration leaves the
# others' results. JSON files and the log go to $1 (default benchmarks/results/cuda), the printed
# tables to $TABLES (default: the same folder); the tables are printed again at the end.
#
#   bash benchmarks/cuda_speed.sh benchmarks/results/cuda
#
# Randomly initialised shapes need only a tokenizer: TOKENIZER names its folder (default: the
# embedded model's, which needs the embedded model installed).
set -u
out=${1:-benchmarks/results/cuda}
tables=${TABLES:-$out}
mkdir -p "$out" "$tables"
tok=()
[ -n "${TOKENIZER:-}" ] && tok=(--tokenizer "$TOKENIZER")
python=${PYTHON:-python}
run() {  # name, limit in seconds, edit_speed arguments...
    local name=$1 limit=$2
    shift 2
    echo "== $name: edit_speed.py $*" | tee -a "$out/log.txt"
    timeout "$limit" "$python" benchmarks/edit_speed.py --device cuda "${tok[@]}" --json "$out/$name.json" "$@" \
        >"$tables/$name.txt" 2>>"$out/log.txt"
    echo "   exit $? after ${SECONDS}s in all" | tee -a "$out/log.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
run gpt2-xl-bf16 240 --shape gpt2-xl --dtype bfloat16 --methods ice-lora,ice --edits 8 --edits-at-once 8
run gpt2-xl-bf16-warmup 180 --shape gpt2-xl --dtype bfloat16 --methods ice-lora --edits 8 --edits-at-once 8 --warmup
run gpt2-xl-bf16-warmup-x32 200 --shape gpt2-xl --dtype bfloat16 --methods ice-lora --edits 32 --edits-at-once 32 --warmup --only-at-once
run gpt2-xl-fp32 180 --shape gpt2-xl --dtype float32 --methods ice-lora,ice --edits 3
run gpt2-xl-fp32-autocast 120 --shape gpt2-xl --dtype float32 --autocast bfloat16 --methods ice-lora --edits 3
run gpt2-medium-bf16 150 --shape gpt2-medium --dtype bfloat16 --methods ice,ice-lora --edits 3
run llama-1b-bf16 180 --shape llama-1b --dtype bfloat16 --methods ice-lora,ice --edits 3
run smollm2-135m-bf16 180 --shape smollm2-135m --dtype bfloat16 --methods ice-lora,ice,lora,ft-m --edits 3 --edits-at-once 3
for table in "$tables"/*.txt; do
    case $table in */log.txt|*/gpu.txt) continue;; esac
    echo "-- $(basename "$table" .txt)"; cat "$table"
done
