#!/usr/bin/env bash
# The GPU checks and figures of howto/finetune_lora.md's "Speed on a GPU" and howto/finetune_adapter.md's comparison with
# LoRA and howto/preference_tuning.md's comparison with TRL, in one go, at most 11.75 minutes (the parts' time limits):
#   1. tests/test_gpu.py (packed records in one varlen flash-attention call, compiled Blocks against eager,
#      finetune_lora.py's CUDA defaults, QLoRA, ...);
#   2. benchmarks/packed_attention.py --device cuda (per record, block-diagonal mask, varlen flash, FlexAttention);
#   3. benchmarks/lora_vs_peft.py --device cuda: Llama-2-7b-hf with LoRA on query+value (ours eager and compiled, and
#      the peak memory at 4 x 512 in bf16 and 1 x 512 in nf4-dq; DoRA, ours and PEFT's, eager), on all_linear (eager),
#      then Llama-3.1-8B on both (eager, no DoRA);
#   4. benchmarks/adapter_vs_lora.py --device cuda: Llama-2-7b-hf (random weights), LoRA r=8 on query+value against
#      LLaMA-Adapter v1 and v2, bf16-mixed: trainable parameters, step time, peak memory;
#   5. benchmarks/dpo_vs_trl.py --device cuda: Llama-3.2-1B (random weights), DPO with LoRA r=8 on query+value, ours
#      against TRL's DPOTrainer + PEFT, bf16-mixed: step time and peak GPU memory.
# Each part has its own time limit, so one that hangs or fails does not cost the others. Run from the repository root
# with the CUDA build of torch already installed (this script never installs torch):
#     OUT=out/gpu_check bash benchmarks/gpu_check.sh
# Everything printed goes to $OUT/*.txt too; $OUT/summary.txt has each part's exit status.
set -u
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    > "$OUT/env.txt" 2>&1; then
    tail -1 "$OUT/env.txt"; echo "no CUDA build of torch with a GPU here: nothing checked" | tee "$OUT/summary.txt"; exit 1
fi
cat "$OUT/env.txt"
# the references and test tools, if missing (requirements-test.txt without its torch line: never a torch from the registry)
if ! python -c "import transformers, peft, trl, datasets, bitsandbytes, lightning, jsonargparse, pytest, sentencepiece" 2>/dev/null; then
    cat requirements.txt requirements-test.txt | grep -v -E '^(torch|-r)' > "$OUT/requirements-no-torch.txt"
    python -m pip install -q -r "$OUT/requirements-no-torch.txt" 2>&1 | tail -3 | tee -a "$OUT/env.txt"
fi
python -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|peft|bitsandbytes|liger|triton|lightning|trl) " | tee -a "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$OUT/env.txt"

run() {  # run NAME SECONDS COMMAND...: the command's output to the screen and $OUT/NAME.txt, its status to summary.txt
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "$name: exit $status in $((SECONDS - start)) s$([ "$status" = 124 ] && echo " (timed out after $seconds s)")" \
        | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
# the tests read ../shared/data (the LLaMA tokenizer, the Alpaca records); where the repository holds shared/ itself
# (a device machine's copy of a working tree), that one
if [ ! -d ../shared/data ] && [ -d shared/data ]; then ln -s "$PWD/shared" ../shared; fi
run test_gpu 190 python -m pytest -q -x -rs tests/test_gpu.py
run packed_attention 45 python benchmarks/packed_attention.py --device cuda
run lora_vs_peft_7b_qv 180 python benchmarks/lora_vs_peft.py --device cuda --models '[Llama-2-7b-hf]' \
    --targets '[query+value]' --steps 10
run lora_vs_peft_7b_all 60 python benchmarks/lora_vs_peft.py --device cuda --models '[Llama-2-7b-hf]' \
    --targets '[all_linear]' --steps 5 --compile false --memory false
run lora_vs_peft_8b 90 python benchmarks/lora_vs_peft.py --device cuda --models '[Llama-3.1-8B]' --steps 5 \
    --compile false --memory false --dora_targets '[]'
run adapter_vs_lora_7b 60 python benchmarks/adapter_vs_lora.py --device cuda --model Llama-2-7b-hf --steps 10
run dpo_vs_trl_1b 75 python benchmarks/dpo_vs_trl.py --device cuda --model Llama-3.2-1B --steps 6 --rounds 2
cat "$OUT/summary.txt"
