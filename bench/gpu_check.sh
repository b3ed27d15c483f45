#!/usr/bin/env bash
# Every GPU check in one run (a device session has 15 minutes of GPU time in all).
#
#   bash bench/gpu_check.sh [--sft-bench]     # in the repo root of a machine with a CUDA GPU
#
# Needs .gpu/ (git-ignored through .git/info/exclude, carried to the device machine):
#   whl/   the wheels the GPU image lacks or has in other versions, for its Python 3.12:
#          pydantic 2.14.3, pydantic_core 2.50.4, annotated-types, typing-inspection,
#          transformers 5.23.0, tokenizers 0.23.3, peft 0.21.2 (pip download --only-binary=:all:
#          --no-deps --python-version 3.12 --platform manylinux2014_x86_64 -d .gpu/whl ...);
#   data/  copies of ../shared/data/{gsm8k/train.jsonl, hh-rlhf/harmless-base/test.jsonl.gz,
#          oasst/en_100_tree.jsonl} (../shared does not travel).
# Writes under $OUT (default /tmp/gpu_out) and prints a short table last.
#   1. the CUDA tests: tests/test_cuda.py (every stage of the tiny pipeline on the GPU with bf16;
#      every training stage with LoRA + bf16 + activation checkpointing; packed = unpacked loss)
#      and the CUDA cases of tests/test_generate.py;
#   2. bench/own_model.py: configs/own_model.yaml (SFT -> reward -> DPO -> GRPO, LoRA + bf16 +
#      checkpointing), shortened, on a random-init Qwen2-0.5B-shaped model (8,192-token vocab),
#      each stage's time and peak GPU memory, and DPO with a live reference, LoRA vs full;
#   3. (--sft-bench) the SFT step benchmark of 2026-11-27 (bench/sft.py, see bench/RESULTS.md).
#   4. (--rl-bench) rollouts on a ~340M-parameter Llama (hidden 1024, 24 layers, 8,192-token
#      vocab, random init): bench/rollout.py static vs hf vs generate at batch 8 and 64, and
#      bench/grpo.py (posttrain side; TRL's needs its wheels in .gpu/whl, not prepared yet).
#      Written 2026-12-06 without a GPU to try it on: run it once and fix what it trips on.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    date -u
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_generate.py \
    -k "cuda or device" -rs 2>&1 | tee "$OUT/pytest.txt" | tail -15

echo "== 2. own model: SFT -> reward -> DPO -> GRPO with LoRA + bf16"
timeout 270 python3 bench/own_model.py --out /tmp/own --data-dir .gpu/data --device cuda \
    --steps 20 --gen-tokens 128 2>"$OUT/own_model.err" | tee "$OUT/own_model.jsonl"
cp /tmp/own/log.txt "$OUT/own_model_log.txt" 2>/dev/null

if [ "${1:-}" = "--sft-bench" ]; then
    echo "== 3. SFT benchmark"
    B=/tmp/bench
    timeout 120 python3 bench/make_inputs.py --out $B --data .gpu/data/gsm8k/train.jsonl --hh none \
        --hidden 768 --layers 12 --heads 12 --intermediate 2048 2>/dev/null | tee "$OUT/inputs.json"
    : >"$OUT/bench_sft.jsonl"
    for prec in fp32 bf16; do
        for pack in "" "--packing"; do
            for impl in minimal posttrain; do
                timeout 90 python3 bench/sft.py --model $B/model --data $B/gsm8k_pc.jsonl --steps 40 \
                    --batch 64 --max-length 512 --lr 1e-4 --device cuda --precision $prec $pack \
                    --impl $impl 2>>"$OUT/bench_sft.err" | tee -a "$OUT/bench_sft.jsonl"
            done
        done
    done
fi

if [ "${1:-}" = "--rl-bench" ] || [ "${2:-}" = "--rl-bench" ]; then
    echo "== 4. rollouts and GRPO"
    R=/tmp/bench_rl
    timeout 120 python3 bench/make_inputs.py --out $R --data .gpu/data/gsm8k/train.jsonl --hh none \
        --hidden 1024 --layers 24 --heads 16 --intermediate 2816 2>/dev/null | tee "$OUT/inputs_rl.json"
    : >"$OUT/bench_rollout.jsonl"
    for batch in 8 64; do
        for impl in generate hf static; do
            timeout 90 python3 bench/rollout.py --model $R/model --prompts $R/prompts.jsonl \
                --batch $batch --max-new-tokens 128 --repeats 3 --impl $impl --device cuda \
                2>>"$OUT/bench_rollout.err" | tee -a "$OUT/bench_rollout.jsonl"
        done
    done
    timeout 120 python3 bench/grpo.py --model $R/model --prompts $R/prompts.jsonl --steps 10 \
        --batch 32 --num-generations 8 --max-new-tokens 128 --lr 1e-6 --device cuda \
        2>"$OUT/bench_grpo.err" | tee "$OUT/bench_grpo.jsonl"
fi

echo "== summary"
tail -3 "$OUT/pytest.txt"
python3 - "$OUT/own_model.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
summary = [r for r in rows if r.get("bench") == "own_model"]
if summary:
    print(f"model: {summary[0]['params'] / 1e6:.1f}M parameters")
print(f"{'stage':15} {'seconds':>8} {'peak GPU MB':>12}  metric")
for r in rows:
    if "stage" in r:
        metric = {k: round(v, 4) for k, v in r.items() if "/" in k}
        print(f"{r['stage']:15} {r['seconds']:8.1f} {r.get('peak_gpu_mb', 0):12}  {metric}")
EOF
