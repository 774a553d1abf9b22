#!/usr/bin/env bash
# The CPU proxy of the full-scale Table 1 measurement (docs/reproductions/table1.md,
# "Measured"): ResNet-8 on 10,000 of the 45,000 training images of full CIFAR-10 (the
# 5,000-image validation split and the 10,000 test images whole), no augmentation, 12
# epochs of the presets' recipe, seed 0, one thread per run.
#   1. make reproduce-table1 with those settings: CE, CE + gap and capped CE + gap under
#      the default reading (loss.lam_reading=summed_ce, λ = 10) -> outputs/multirun/table1;
#   2. the other reading, two runs side by side into the same sweep folder: capped CE + gap
#      with loss.lam_reading=mean_ce, λ = 10, without and with a 4-epoch λ warm-up;
#   3. calibrun-report over all five -> outputs/tables/table1_proxy.md.
# Usage: bash benchmarks/table1_proxy.sh /path/to/CIFAR-10-images   (read with data.format=folder)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: table1_proxy.sh CIFAR10_FOLDER}
BIN=${BIN:-.venv/bin}
PROXY="model=resnet110 model.depth=8 data.train_subset=10000 data.augment=false trainer.device=cpu"
export OMP_NUM_THREADS=1
mkdir -p outputs/logs
status=0 pids=()
make reproduce-table1 DATA_ROOT="$ROOT" DATA_FORMAT=folder EPOCHS=12 ARGS="$PROXY" \
    > outputs/logs/table1_proxy_make.log 2>&1 || status=1
for warmup in 0 4; do
    $BIN/calibrun -m experiment=table1_gap_cap loss.lam=10 loss.lam_reading=mean_ce loss.warmup_epochs=$warmup \
        data.root="$ROOT" data.format=folder trainer.epochs=12 trainer.progress=false run_name=table1 $PROXY \
        > "outputs/logs/table1_proxy_mean_ce_warmup$warmup.log" 2>&1 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
$BIN/calibrun-report outputs/multirun/table1 --out outputs/tables --name table1_proxy --calibrators none,temperature \
    --paper table1 --table-metrics accuracy,ece,mce,nll,oe --grid-name table1_proxy_reliability.png \
    --caption "CPU proxy on full CIFAR-10 (the lossy JPEG copy): ResNet-8, 10,000 training images, no augmentation, \
12 epochs, seed 0, 10 bins; loss.lam_reading names the reading of λ = 10." || status=1
exit $status
