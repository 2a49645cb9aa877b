#!/usr/bin/env bash
# The GPU checks of a session that is lent a device: one call, at most 420 s of stages, in priority order.
#   device run, timeout_s 480:  bash bench/gpu_check.sh
#   here, without a GPU:        bash bench/gpu_check.sh --dry-run   (every stage's JSON, CUDA stages skipped)
# Every stage writes its JSON under $OUT as soon as it finishes, so a run cut off early still returns the
# stages before; with log.txt that is 8 files at most (the device tool brings back 8). Nothing needs a
# package the GPU image lacks (torch 2.11, triton 3.6, Python 3.12, pytest, PyYAML; no omegaconf):
# the training stage builds its configs without omegaconf (bench/train_curves.py).
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
: >"$LOG"
status=0
# name:seconds, in the order run; the sum (plus 3 s of kill grace each) stays within 420 s.
STAGES="env:20 kernels_attention:65 kernels_linear:35 tests:60 train:120 speed_attention:45 speed_train:45"

budget() { for s in $STAGES; do [ "${s%%:*}" = "$1" ] && echo "${s##*:}"; done; }

# stage NAME CUDA(0|1) COMMAND...: run COMMAND under the stage's timeout; it writes $OUT/NAME.json itself,
# else a JSON line with its exit code and the tail of its output is written for it.
stage() {
    local name=$1 cuda=$2
    shift 2
    local limit
    limit=$(budget "$name")
    local json="$OUT/$name.json" t0=$SECONDS rc
    echo "=== $name (timeout ${limit}s)" | tee -a "$LOG"
    if [ "$cuda" = 1 ] && [ "$DRY" = 1 ]; then
        "$PY" - "$json" "$name" "$limit" "$*" <<'EOF'
import json, sys
json.dump(dict(stage=sys.argv[2], skipped="dry run (needs CUDA)", timeout_s=int(sys.argv[3]), command=sys.argv[4]),
          open(sys.argv[1], "w"), indent=1)
EOF
        return 0
    fi
    rm -f "$json"
    local run_limit=$limit
    [ "$DRY" = 1 ] && run_limit=$((limit * 6))  # a loaded CPU machine imports torch slowly; the budget is the GPU's
    timeout -k 3 "$run_limit" "$@" >"$OUT/.$name.out" 2>&1
    rc=$?
    cat "$OUT/.$name.out" >>"$LOG"
    [ $rc = 0 ] || status=1
    "$PY" - "$json" "$name" "$limit" "$rc" "$((SECONDS - t0))" "$OUT/.$name.out" <<'EOF'
import json, os, sys
path, name, limit, rc, secs, out = sys.argv[1:]
tail = open(out, errors="replace").read().splitlines()[-40:]
data = json.load(open(path)) if os.path.exists(path) else {}
if not isinstance(data, dict):
    data = {"result": data}
data.update(stage=name, rc=int(rc), timed_out=int(rc) in (124, 137), seconds=int(secs), timeout_s=int(limit),
            output_tail=tail)
json.dump(data, open(path, "w"), indent=1)
EOF
    rm -f "$OUT/.$name.out"
    echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

# 1. Environment: versions, the GPU, what is importable.
stage env 0 "$PY" - "$OUT/env.json" <<'EOF'
import importlib, json, platform, subprocess, sys
info = dict(python=platform.python_version())
for mod in ("torch", "triton", "transformers", "omegaconf", "yaml", "pytest", "xxhash", "fla", "flash_attn"):
    try:
        info[mod] = getattr(importlib.import_module(mod), "__version__", "present")
    except Exception as exc:
        info[mod] = None
import torch
info["cuda"] = torch.cuda.is_available()
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                torch_cuda=torch.version.cuda)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=5).stdout.strip()
except Exception:
    info["nvidia_smi"] = None
import braid.kernels.fused, braid.trainer.trainer  # the package imports without the CPU-only extras
print(json.dumps(info))
json.dump(info, open(sys.argv[1], "w"), indent=1)
EOF

# 2. Every Triton kernel in bf16 (some fp16/fp32) against the fp32 torch path: PASS/FAIL tables.
stage kernels_attention 1 "$PY" bench/gpu_attention_check.py --json "$OUT/kernels_attention.json"
stage kernels_linear 1 "$PY" bench/gpu_linear_check.py --json "$OUT/kernels_linear.json"

# 3. The CUDA-relevant tests only (CUDA tensors where the tests have them; the rest skip fast).
stage tests 1 "$PY" -m pytest -x -q -p no:cacheprovider -o addopts= tests/test_cuda.py tests/test_self_check.py \
    tests/test_fused_wiring.py

# 4. A bf16 training run of every tiny preset, loss against the committed CPU fp32 curves.
stage train 1 "$PY" bench/train_curves.py --device cuda --precision bf16 --json "$OUT/train.json"

# 5. Short speed sweeps: attention vs SDPA flash (and flash-attn / fla when carried), a 1B-class step's MFU.
stage speed_attention 1 "$PY" bench/kernels.py --sections attention --max-t 4096 --warmup 3 --rep 10 \
    --json "$OUT/speed_attention.json"
stage speed_train 1 "$PY" bench/train_throughput.py --preset llama-1b --seq-len 2048 --micro-batch 4 --steps 4 \
    --warmup 2 --json "$OUT/speed_train.json"
exit $status
