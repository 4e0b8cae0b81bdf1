#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU (no network needed): the `cuda` tests, then every benchmark that
# takes --device cuda, all results in one JSONL file under benchmarks/results/. On a machine without a usable CUDA
# GPU it says why and exits 0 without running anything.
#
#   bash benchmarks/gpu.sh                 # from the repository root
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#
# Missing packages (e.g. fla-core for the linear-attention comparison) are installed from wheels brought along in
# wheels/ (pip install --no-index --find-links wheels ...), never from the network. The tests get at most
# TEST_TIMEOUT seconds (default 120) and each benchmark its own limit below (BENCH_TIMEOUT, default 60, for one not
# listed), so that the whole run stays within about 6 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-60}
TEST_TIMEOUT=${TEST_TIMEOUT:-120}
# per benchmark: a time limit in seconds and options that size it for one GPU
declare -A LIMIT=([benchmarks/linear_attention.py]=150 [benchmarks/decoding.py]=60 [benchmarks/clipping.py]=40
                  [benchmarks/integrated_gradients.py]=40 [benchmarks/bert_forward.py]=30
                  [benchmarks/simbert_search.py]=40)
declare -A OPTIONS=([benchmarks/decoding.py]="--repeats 5 --batches 1 16" [benchmarks/clipping.py]="--repeats 5")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET                                # compiled kernels on the GPU, not the interpreter

why=$("$PYTHON" - <<'PY'
import shutil
try:
    import torch
except Exception as e:
    print(f"torch does not import: {e}"); raise SystemExit
if not torch.cuda.is_available():
    print(f"no CUDA GPU visible to torch {torch.__version__} (torch.version.cuda={torch.version.cuda})")
    raise SystemExit
try:
    import triton  # noqa: F401
except Exception as e:
    print(f"triton does not import: {e}")
PY
)
if [ -n "$why" ]; then
    echo "gpu.sh: skipped: $why"
    exit 0
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p benchmarks/results
out="benchmarks/results/gpu-$stamp.jsonl"
t_start=$(date +%s)

# wheels brought along in the working tree (no network on the GPU machine)
if [ -d wheels ]; then
    "$PYTHON" -c "import fla" 2>/dev/null || "$PYTHON" -m pip install -q --no-index --find-links wheels fla-core \
        || echo "gpu.sh: fla-core not installed from wheels/ (the fla columns will be skipped)"
fi

"$PYTHON" - "$out" <<'PY'
import json, platform, sys, torch
info = {"record": "machine", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version()}
for name in ("triton", "fla", "transformers", "captum"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:
        info[name] = f"unavailable ({type(e).__name__})"
open(sys.argv[1], "a").write(json.dumps(info) + "\n")
print(info)
PY

# 1. the cuda tests
t0=$(date +%s)
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider -o addopts="" --continue-on-collection-errors tests 2>&1 \
    | tee /tmp/gpu-sh-pytest.log
rc=${PIPESTATUS[0]}
"$PYTHON" - "$out" "$rc" "$(( $(date +%s) - t0 ))" /tmp/gpu-sh-pytest.log <<'PY'
import json, sys
tail = open(sys.argv[4]).read().strip().splitlines()[-1:]
open(sys.argv[1], "a").write(json.dumps({"record": "pytest -m cuda", "rc": int(sys.argv[2]),
                                         "seconds": int(sys.argv[3]), "summary": tail}) + "\n")
PY

# 2. every benchmark that accepts --device (and --jsonl, where it writes structured rows)
for bench in benchmarks/*.py; do
    help=$("$PYTHON" "$bench" --help 2>&1)
    if ! grep -q -- "--device" <<<"$help"; then
        echo "gpu.sh: $bench skipped: it has no --device option"
        echo "{\"record\": \"benchmark\", \"script\": \"$bench\", \"skipped\": \"no --device option\"}" >> "$out"
        continue
    fi
    args=(--device cuda ${OPTIONS[$bench]:-})
    grep -q -- "--jsonl" <<<"$help" && args+=(--jsonl "$out")
    echo "== $bench ${args[*]}"
    t0=$(date +%s)
    timeout "${LIMIT[$bench]:-$BENCH_TIMEOUT}" "$PYTHON" "$bench" "${args[@]}" 2>&1 | tee /tmp/gpu-sh-bench.log
    rc=${PIPESTATUS[0]}
    "$PYTHON" - "$out" "$bench" "$rc" "$(( $(date +%s) - t0 ))" /tmp/gpu-sh-bench.log <<'PY'
import json, sys
text = open(sys.argv[5]).read()
open(sys.argv[1], "a").write(json.dumps({"record": "benchmark", "script": sys.argv[2], "rc": int(sys.argv[3]),
                                         "seconds": int(sys.argv[4]), "stdout": text[-20000:]}) + "\n")
PY
done
echo "gpu.sh: done in $(( $(date +%s) - t_start )) s; results in $out"
