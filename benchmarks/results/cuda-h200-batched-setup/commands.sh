#!/usr/bin/env bash
# The runs behind benchmarks/results/cuda-h200-batched-setup: the ice-lora preset (relation anchors,
# lora_projection_energy 0.98, patience 4) on one NVIDIA H200, gpt2-xl shape, in one call on a freshly
# started machine, each configuration under its own time limit. The code with the once-per-call work
# of edits trained together batched (every edit's anchors in one greedy decode, every adapter's
# protection inputs in one routed forward pass, each module's Gram matrices decomposed in one host
# call), against the code before it (BEFORE_PATH: a PYTHONPATH whose icelora is that code) on the
# same machine. OUT: where the files go; TOKENIZER: a folder holding the embedded model's
# tokenizer.json and tokenizer_config.json.
#
#   OUT=benchmarks/results/cuda-h200-batched-setup TOKENIZER=TOKENIZER_DIR BEFORE_PATH=OLD_SRC \
#       bash benchmarks/results/cuda-h200-batched-setup/commands.sh
set -u
out=${OUT:?OUT names the output folder}
tok=${TOKENIZER:?TOKENIZER names the tokenizer folder}
before=${BEFORE_PATH:?BEFORE_PATH names a PYTHONPATH holding the code before}
python=${PYTHON:-python3}
mkdir -p "$out"
step() {  # name, limit in seconds, edit_speed arguments...
    local name=$1 limit=$2
    shift 2
    echo "== $name: edit_speed.py $* (after ${SECONDS}s)" | tee -a "$out/log.txt"
    echo "-- $name" >>"$out/tables.txt"
    timeout "$limit" "$python" benchmarks/edit_speed.py --device cuda --tokenizer "$tok" --shape gpt2-xl \
        --json "$out/$name.json" "$@" >>"$out/tables.txt" 2>>"$out/log.txt"
    echo "   exit $? after ${SECONDS}s in all" | tee -a "$out/log.txt"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
    timeout 60 "$python" -m pytest -q -p no:cacheprovider tests/test_input_projection.py -k cuda 2>&1 | tail -4
    echo "pytest exit ${PIPESTATUS[0]}"
} >"$out/checks.txt" 2>&1
cat "$out/checks.txt"
# 32 edits trained together: target 0.5 s per edit amortised.
step x32-bf16 130 --dtype bfloat16 --methods ice-lora --warmup --edits 32 --edits-at-once 32 --only-at-once
# Where those 32 edits' time goes.
echo "== profile-x32 (after ${SECONDS}s)" | tee -a "$out/log.txt"
(cd benchmarks && timeout 100 "$python" profile_edit.py --device cuda --tokenizer "../$tok" --shape gpt2-xl \
    --dtype bfloat16 --method ice-lora --edits-at-once 32 --rows 25 >"$out/profile-x32.txt" 2>>"$out/log.txt")
echo "   exit $? after ${SECONDS}s in all" | tee -a "$out/log.txt"
# The same 32 edits with the code before, same machine.
PYTHONPATH=$before step x32-bf16-before 130 --dtype bfloat16 --methods ice-lora --warmup --edits 32 \
    --edits-at-once 32 --only-at-once
# One edit alone: target 1.5 s.
step alone-bf16 80 --dtype bfloat16 --methods ice-lora --warmup --edits 8
cat "$out/tables.txt"
head -12 "$out/profile-x32.txt"
#
# Files 1-* come from that call (PYTHONPATH /tmp/site plus the working tree's src; BEFORE_PATH the
# same with the code before in place of src). Its profile step wrote nothing within its 100 s (the
# profiled 32 edits took 19.6 s, the profiler's processing of their events the rest, 1-log.txt).
# Files 2-* come from a second call right after it on the same machine, which gave the profile
# 200 s (again the profiled edits finished, 17.1 s, and the processing did not, 2-profile-log.txt)
# and ran the 32 edits again:
#
#   (cd benchmarks && timeout 200 python3 profile_edit.py --device cuda --tokenizer ../.tok --shape gpt2-xl \
#       --dtype bfloat16 --method ice-lora --edits-at-once 32 --rows 25)
#   timeout 130 python3 benchmarks/edit_speed.py --device cuda --tokenizer .tok --shape gpt2-xl \
#       --json x32-bf16-repeat.json --dtype bfloat16 --methods ice-lora --warmup --edits 32 --edits-at-once 32 \
#       --only-at-once
