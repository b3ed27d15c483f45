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
