#!/usr/bin/env bash
# Issue 16's checks in one call on a CUDA machine (the device tool's `run`, carrying .whl
# from benchmarks/device_wheels.sh): install calibrun into the machine's Python, then
#   1. nvidia-smi and the versions,
#   2. make test-gpu and make test (the CPU suite, run there as well),
#   3. make bench-gpu,
#   4. make reproduce-table1 and make reproduce-pacs on the bundled samples, a few epochs,
# logging each to $OUT (default outputs/gpu_session) and packing the tables and figures.
# Steps go on after a failure; the exit status says whether any failed. All three steps
# may not fit one 10-minute call: run STEPS=tests, STEPS=bench and STEPS=reproduce apart.
# The bench step also times calibrun with torch.compile, and with CUDA graphs
# (compile_mode=reduce-overhead); BENCH_ARGS replaces those options.
# Usage: OUT=... STEPS="tests bench reproduce" bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_session}
STEPS=${STEPS:-tests bench reproduce}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=$(command -v python3)
BIN=$(dirname "$PY")
failed=0

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc in $((SECONDS - start)) s"; tail -n 15 "$OUT/$name.log"
    [ $rc -eq 0 ] || failed=1
}

"$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
# The Makefile's targets use $(BIN); the machine's Python stands in for .venv.
touch "$BIN/.installed"
make_args=(BIN="$BIN" VENV="$(dirname "$BIN")")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"

if [[ $STEPS == *tests* ]]; then
    step test_gpu make "${make_args[@]}" test-gpu
    step test make "${make_args[@]}" test
fi
if [[ $STEPS == *bench* ]]; then
    export BENCH_ARGS=${BENCH_ARGS:---variant "compiled:trainer.compile=true" --variant \
"graphs:trainer.compile=true trainer.compile_mode=reduce-overhead"}
    step bench_gpu make "${make_args[@]}" bench-gpu
    cp outputs/bench/bench_gpu.md outputs/bench/bench_gpu.csv "$OUT"/ 2>/dev/null
fi
if [[ $STEPS == *reproduce* ]]; then
    step table1 make "${make_args[@]}" reproduce-table1 DATA=cifar10_sample EPOCHS=3 ARGS="trainer.device=cuda"
    step pacs make "${make_args[@]}" reproduce-pacs DATA=pacs_sample TRAINER=quick EPOCHS=3 SEEDS=1 \
        ARGS="trainer.device=cuda model.pretrained=false trainer.batch_size=16"
    tar czf "$OUT/tables.tgz" outputs/tables 2>/dev/null
fi
exit $failed
