# The runs behind benchmarks/results/cuda-h200-graphs (one NVIDIA H200; TOKENIZER_DIR: a folder
# holding the embedded model's tokenizer.json and tokenizer_config.json). Each call ran on its own
# freshly started machine, the rows of one call one after another.

# Call 1 (files 4-edits-*): the CUDA tests, 4 edits with and without graphs, then the profile.
python -m pytest -q tests/test_sampling_graphs.py
for g in yes no; do
  python benchmarks/edit_speed.py --device cuda --tokenizer TOKENIZER_DIR --shape gpt2-xl --dtype bfloat16 \
      --methods ice-lora --warmup --edits 4 --cuda-graphs $g --json 4-edits-gpt2-xl-bf16-warmup-graphs-$g.json
done
(cd benchmarks && python profile_edit.py --device cuda --tokenizer TOKENIZER_DIR --shape gpt2-xl --dtype bfloat16 \
    --method ice-lora --rows 30 --cuda-graphs yes > 4-edits-profile-graphs.txt)

# Call 2 (files 8-edits-*): 8 edits with and without graphs, then float32 beside the reference objective.
for g in yes no; do
  python benchmarks/edit_speed.py --device cuda --tokenizer TOKENIZER_DIR --shape gpt2-xl --dtype bfloat16 \
      --methods ice-lora --warmup --edits 8 --cuda-graphs $g --json 8-edits-gpt2-xl-bf16-warmup-graphs-$g.json
done
python benchmarks/edit_speed.py --device cuda --tokenizer TOKENIZER_DIR --shape gpt2-xl --dtype float32 \
    --methods ice-lora,ice --edits 3 --json 8-edits-gpt2-xl-fp32.json

# Call 3 (files 8-edits-shared-streams-*): the CUDA tests and 8 edits with graphs, after the warm-up
# and capture streams became one per device (no new cuBLAS workspace per edit).
python -m pytest -q tests/test_sampling_graphs.py
python benchmarks/edit_speed.py --device cuda --tokenizer TOKENIZER_DIR --shape gpt2-xl --dtype bfloat16 \
    --methods ice-lora --warmup --edits 8 --cuda-graphs yes --json 8-edits-shared-streams-gpt2-xl-bf16-warmup-graphs-yes.json

# Call 4 (files 8-edits-same-machine-*): the CUDA tests, then 8 edits with and without graphs on the
# same machine (the code of call 3).
python -m pytest -q tests/test_sampling_graphs.py
for g in yes no; do
  python benchmarks/edit_speed.py --device cuda --tokenizer TOKENIZER_DIR --shape gpt2-xl --dtype bfloat16 \
      --methods ice-lora --warmup --edits 8 --cuda-graphs $g --json 8-edits-same-machine-gpt2-xl-bf16-warmup-graphs-$g.json
done

# Call 5 (files 8-edits-training-graphs-*): the CUDA tests of both graph modules, then the same 8
# edits with the sampling and training passes recorded (yes), the sampling passes only, and eagerly.
python -m pytest -q tests/test_training_graphs.py tests/test_sampling_graphs.py
for g in yes sampling no; do
  python benchmarks/edit_speed.py --device cuda --tokenizer TOKENIZER_DIR --shape gpt2-xl --dtype bfloat16 \
      --methods ice-lora --warmup --edits 8 --cuda-graphs $g --json 8-edits-training-graphs-gpt2-xl-bf16-warmup-graphs-$g.json
done

# Call 6 (files 8-edits-call6-*): the current code (call 5's after review), the CUDA tests of both
# graph modules and the same 8 edits with graphs.
python -m pytest -q tests/test_training_graphs.py tests/test_sampling_graphs.py
python benchmarks/edit_speed.py --device cuda --tokenizer TOKENIZER_DIR --shape gpt2-xl --dtype bfloat16 \
    --methods ice-lora --warmup --edits 8 --cuda-graphs yes --json 8-edits-call6-gpt2-xl-bf16-warmup-graphs-yes.json
