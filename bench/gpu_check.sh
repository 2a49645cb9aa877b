#!/usr/bin/env bash
# The GPU checks of a session that is lent a device (see the developers' guide). One call:
#   make gpu-wheels                      # here, once: wheels the GPU image lacks, into .whl/
#   device run, carry [".whl"], timeout_s <= 480:  bash bench/gpu_check.sh
# Writes logs and JSON under $OUT (the device tool brings them back) and bench/results/.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
status=0
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# 1. The test suite on the GPU machine (CUDA paths are exercised where tests have them).
timeout 240 python3 -m pytest -x -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" || status=1

# 2. A short real training run on CUDA with bf16 autocast: loss must fall, MFU is reported.
timeout 120 python3 -m braid.train --config configs/tiny.yaml run.dir=/tmp/gpu-run train.steps=60 \
    logging.interval=10 checkpoint.interval=60 2>&1 | tee "$OUT/train.txt" || status=1
cp /tmp/gpu-run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null

# 3. Every Triton attention option in bf16 against the fp32 torch path, then the kernel sweep.
timeout 150 python3 bench/gpu_attention_check.py --json "$OUT/gpu_attention_check.json" 2>&1 \
    | tee "$OUT/attention_check.txt" || status=1
timeout 240 python3 bench/kernels.py --sections attention --json "$OUT/kernels_attention.json" 2>&1 \
    | tee "$OUT/kernels.txt" || status=1

# 4. Triton KDA, selective scan and fused ops in bf16 against fp32 torch, then their sweep.
timeout 90 python3 bench/gpu_linear_check.py --json "$OUT/gpu_linear_check.json" 2>&1 \
    | tee "$OUT/gpu_linear_check.txt" || status=1
timeout 150 python3 bench/kernels_linear.py --json "$OUT/kernels_linear.json" 2>&1 \
    | tee "$OUT/kernels_linear.txt" || status=1

# 5. Throughput of a 125M model at a realistic sequence length.
timeout 120 python3 bench/train_throughput.py --preset gpt-125m --seq-len 2048 --micro-batch 8 --steps 10 \
    --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/throughput.txt" || status=1
cp "$OUT"/*.json bench/results/ 2>/dev/null
exit $status
