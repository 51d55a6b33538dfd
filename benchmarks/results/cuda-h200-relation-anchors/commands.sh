#!/usr/bin/env bash
# The runs behind benchmarks/results/cuda-h200-relation-anchors: the ice-lora preset (relation
# anchors, lora_projection_energy 0.98, patience 4) on one NVIDIA H200, gpt2-xl shape, in two calls,
# each on its own freshly started machine, each configuration under its own time limit. OUT: where
# the files go; TOKENIZER: a folder holding the embedded model's tokenizer.json and
# tokenizer_config.json. Each file was renamed with its call's prefix.
#
#   OUT=benchmarks/results/cuda-h200-relation-anchors TOKENIZER=TOKENIZER_DIR \
#       bash benchmarks/results/cuda-h200-relation-anchors/commands.sh
#
# Call 1 (files 1-*): the graph modules' CUDA tests and four configurations, on the code of commit
# 98840a0 (the SVD of the protected directions on the device, module_inputs through a boolean mask).
#
# Call 2 (files 2-*; CALL=2, BEFORE_PATH: a PYTHONPATH whose icelora is commit 98840a0's): the code
# of commit a63f83a (module_inputs takes the anchors' positions by index) with leading_directions
# changed to take its SVD on a host copy, as host_svd in benchmarks/direction_speed.py does:
#
#     u, s, _ = torch.linalg.svd(inputs.detach().cpu().T.double(), full_matrices=False)
#     share = (s**2).cumsum(0) / (s**2).sum()
#     k = int((share < energy).sum()) + 1
#     return u[:, :k].to(inputs.device, inputs.dtype)
#
# then the directions timed three ways, one edit of that code profiled, and the first configuration
# again on commit 98840a0's code. The step alone-bf16-host-svd hit its 75 s limit in the untimed
# counting edits after its JSON file was written. 2-directions.txt came from the direction_speed.py
# of that call, whose "host svd" column was leading_directions (host SVD) and "device svd" the SVD on
# the device: the same columns as the script's, at --positions 48,96,192.
set -u
out=${OUT:?OUT names the output folder}
tok=${TOKENIZER:?TOKENIZER names the tokenizer folder}
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
[ "${CALL:-1}" = 2 ] || {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
    timeout 90 "$python" -m pytest -q -p no:cacheprovider tests/test_training_graphs.py tests/test_sampling_graphs.py 2>&1 \
        | tail -15
    echo "pytest exit ${PIPESTATUS[0]}"
} >"$out/checks.txt" 2>&1
if [ "${CALL:-1}" = 2 ]; then
    # Call 2 (see above).
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/log.txt"
    step alone-bf16-host-svd 75 --dtype bfloat16 --methods ice-lora --warmup --edits 8
    step x32-bf16-host-svd 130 --dtype bfloat16 --methods ice-lora --warmup --edits 32 --edits-at-once 32 \
        --only-at-once
    timeout 40 "$python" benchmarks/direction_speed.py --device cuda --positions 48,96,192 >"$out/directions.txt" 2>>"$out/log.txt"
    (cd benchmarks && timeout 50 "$python" profile_edit.py --device cuda --tokenizer "../$tok" --shape gpt2-xl \
        --dtype bfloat16 --method ice-lora --rows 25 >"$out/profile.txt" 2>>"$out/log.txt")
    # The code before the change (BEFORE_PATH), same machine.
    PYTHONPATH=${BEFORE_PATH:-} step alone-bf16-before 75 --dtype bfloat16 --methods ice-lora --warmup --edits 8
    cat "$out/tables.txt" "$out/directions.txt"
    exit
fi
cat "$out/checks.txt"
# One edit alone, both passes from CUDA graphs (the default on CUDA): target 1.5 s.
step alone-bf16 130 --dtype bfloat16 --methods ice-lora --warmup --edits 8
# 32 edits trained together: target 0.5 s per edit amortised.
step x32-bf16 130 --dtype bfloat16 --methods ice-lora --warmup --edits 32 --edits-at-once 32 --only-at-once
# The reference objective on full matrices in float32 beside ice-lora: time and peak memory ratios.
step fp32-vs-ice 130 --dtype float32 --methods ice-lora,ice --edits 3
# One context per step (contexts_per_step 1, not the preset): a layout and its recordings per context.
step alone-bf16-cps1 80 --dtype bfloat16 --methods ice-lora --warmup --edits 8 \
    --ice-lora-config configs/validation/cps1.yaml
cat "$out/tables.txt"
