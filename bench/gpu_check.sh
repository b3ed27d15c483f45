#!/usr/bin/env bash
# Every GPU check in one run (a device session has 15 minutes of GPU time in all).
#
#   bash bench/gpu_check.sh            # in the repo root of a machine with a CUDA GPU
#
# Needs .gpu/ (git-ignored, carried to the device machine): whl/ with the wheels the GPU image
# lacks or has in other versions (pydantic and its parts, transformers, tokenizers; see
# bench/RESULTS.md), and gsm8k_train.jsonl (a copy of ../shared/data/gsm8k/train.jsonl, which
# does not travel). Writes under $OUT (default /tmp/gpu_out) and prints a short table last.
#   1. the CUDA tests: tests/test_cuda.py (every stage of the tiny pipeline on the GPU, bf16
#      training, packed = unpacked loss) and the CUDA cases of tests/test_generate.py;
#   2. bench/sft.py on a ~98M-parameter Llama (hidden 768, 12 layers, 8,192 vocab), GSM8K,
#      64 examples x 40 steps, max length 512: {fp32, bf16} x {padded, packed} x {minimal, posttrain};
#   3. posttrain bf16 packed in rows of a fixed 512 tokens, compiled first then eager, at 64 and
#      128 examples per step (whether train.compile's gain holds with a cold compile cache).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
    date -u
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. CUDA tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_generate.py \
    -k "cuda or device" -rs 2>&1 | tee "$OUT/pytest.txt" | tail -15

echo "== 2. SFT benchmark"
B=/tmp/bench
timeout 120 python3 bench/make_inputs.py --out $B --data .gpu/gsm8k_train.jsonl --hh none \
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

echo "== 3. train.compile, fixed row shapes (rows padded to 512, as the SFT stage does)"
for args in "--compile" "" "--compile --batch 128 --steps 20" "--batch 128 --steps 20"; do
    timeout 120 python3 bench/sft.py --model $B/model --data $B/gsm8k_pc.jsonl --steps 40 \
        --batch 64 --max-length 512 --lr 1e-4 --device cuda --precision bf16 --packing \
        --fixed-rows $args 2>>"$OUT/bench_sft.err" | tee -a "$OUT/bench_sft.jsonl"
done

echo "== summary"
tail -3 "$OUT/pytest.txt"
python3 - "$OUT/bench_sft.jsonl" <<'EOF'
import json, sys
print(f"{'impl':10} {'prec':5} {'packed':6} {'comp':5} {'fixed':5} {'tok/s':>9} {'s':>6} {'GPU MB':>8} {'TFLOP/s':>8} {'MFU':>6} {'pad':>5}  mean_loss")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['impl']:10} {r['precision']:5} {str(r['packing']):6} {str(r['compile']):5} "
          f"{str(r['fixed_rows']):5} {r['tokens_per_s']:9.0f} "
          f"{r['seconds']:6.2f} {r['peak_gpu_mb']:8.0f} {r['model_tflops']:8.1f} {r['mfu']:6.3f} "
          f"{r['padding_share']:5.2f}  {r['mean_loss']:.6f}")
EOF
