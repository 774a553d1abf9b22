#!/usr/bin/env bash
# The first GPU session (issue 21) in two calls of the device tool's `run`, each under
# 9 minutes, inside a 15-minute budget that leaves room for one rerun:
#
#   command 1 (carry .whl):  bash benchmarks/gpu_session.sh 1
#     install, versions, make test-gpu, the test files that train, resume and predict,
#     then make bench-gpu (calibrun, the usual DataLoader pipeline, a bare loop; eager,
#     torch.compile and CUDA-graph rows), 2 timed epochs per row;
#   command 2 (carry .whl and data/cifar10-jpeg.npz):  bash benchmarks/gpu_session.sh 2
#     Table 1 at full scale: the three runs (ce, gap, gap_cap) on full CIFAR-10 from the
#     packed JPEGs (data.format=packed), side by side on the one GPU, then calibrun-report.
#
# data/cifar10-jpeg.npz is made here with `calibrun-pack CIFAR-10-images data/cifar10-jpeg.npz`
# (54 MiB; git-ignored). Logs and results go to $OUT (the device tool's folder; default
# outputs/gpu_session). On a CPU, DEVICE=cpu and SMOKE=1 run both end to end on a few
# batches (PYTHON=.venv/bin/python), which is how they are checked before a GPU call.
# Settings: EPOCHS (command 2, default 30), LAM_ARGS (command 2: the λ reading of the gap
# rows, default the presets' own), BENCH_ARGS (command 1).
set -uo pipefail
cd "$(dirname "$0")/.."
COMMAND=${1:?usage: gpu_session.sh 1|2}
OUT=${OUT:-outputs/gpu_session}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3)}
failed=0

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, say how long, remember a failure
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc in $((SECONDS - start)) s"; tail -n 12 "$OUT/$name.log"
    [ $rc -eq 0 ] || failed=1
}

install() {  # the machine's Python has torch but not Hydra: the carried wheels, then calibrun
    if [ -d .whl ]; then "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1; fi
    "$PY" -c "import calibrun.commands.calibrun" 2>/dev/null \
        || "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    # The Makefile's targets use $(BIN): the folder of this Python stands in for .venv/bin.
    BIN=$(dirname "$PY"); touch "$BIN/.installed"
    MAKE_ARGS=(BIN="$BIN" VENV="$(dirname "$BIN")")
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
      "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"; } | tee "$OUT/gpu.txt"
}

command1() {
    # The GPU tests too: -m replaces pyproject's "not slow and not gpu".
    local tests=(tests/test_resume.py tests/test_predict.py tests/test_training_curves.py tests/test_gpu.py) marks="not slow"
    local bench=${BENCH_ARGS:---repeats 2 --variant "compiled:trainer.compile=true" --variant \
"graphs:trainer.compile=true trainer.compile_mode=reduce-overhead"}
    if [ "$SMOKE" = 1 ]; then
        tests=(tests/test_predict.py) marks="not slow and not gpu"
        bench="--device $DEVICE --models resnet20 --images 256 --pacs-images 0 --repeats 1"
    fi
    step test_gpu make "${MAKE_ARGS[@]}" test-gpu
    step test_train_resume_predict "$PY" -m pytest -q "${tests[@]}" -m "$marks"
    step bench_gpu make "${MAKE_ARGS[@]}" bench-gpu BENCH_ARGS="$bench"
    cp outputs/bench/bench_gpu.md outputs/bench/bench_gpu.csv "$OUT"/ 2>/dev/null
}

command2() {
    local pack=${PACK:-data/cifar10-jpeg.npz} epochs=${EPOCHS:-30} extra=""
    [ -f "$pack" ] || { echo "$pack is missing: make it with calibrun-pack and carry it"; exit 1; }
    [ "$SMOKE" = 1 ] && { epochs=1; extra="data.train_subset=256 data.test_subset=256 data.val_size=256"; }
    local args="data.root=$PWD/$pack data.format=packed trainer.device=$DEVICE trainer.epochs=$epochs
        trainer.progress=false run_name=table1_gpu $extra"
    # Decode the JPEGs once into the cache, so the three runs do not decode them three times.
    step decode "$PY" -c "from calibrun.data import CIFAR; CIFAR(root='$pack', format='packed', download=False).splits()"
    local start=$SECONDS pids=()
    for experiment in table1_ce table1_gap table1_gap_cap; do
        local lam=""; [ $experiment != table1_ce ] && lam=${LAM_ARGS:-}
        "$BIN/calibrun" -m experiment=$experiment $lam $args > "$OUT/$experiment.log" 2>&1 & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    echo "=== three Table 1 runs side by side: $((SECONDS - start)) s"; tail -n 3 "$OUT"/table1_*.log
    grep -h "epoch .*/$epochs " "$OUT"/table1_*.log | tail -n 6
    step report "$BIN/calibrun-report" outputs/multirun/table1_gpu --out "$OUT" --name table1 --calibrators none,temperature \
        --paper table1 --table-metrics accuracy,ece,mce,nll --grid-calibrator none --grid-name figure3.png
    # The device returns at most 8 files: the table and figure apart, the rest in one archive
    # (each run's metrics, history and reliability diagrams).
    tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=logits outputs/multirun/table1_gpu 2>/dev/null
}

pack_logs() {  # every log and small table in one archive, beside the files read first
    tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.csv *.txt 2>/dev/null) && \
        (cd "$OUT" && rm -f *.log table1.csv bench_gpu.csv)
}

install
"command$COMMAND"
pack_logs
ls "$OUT"
exit $failed
