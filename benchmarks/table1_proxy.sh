#!/usr/bin/env bash
# The CPU proxy of the full-scale Table 1 measurement (README "Reproducing Table 1",
# "Measured"): ResNet-8 on 10,000 of the 45,000 training images of full CIFAR-10 (the
# 5,000-image validation split and the 10,000 test images whole), 12 epochs of the
# default recipe, one thread per run, two runs at a time. Every reading of λ is one
# calibrun call; all land in outputs/multirun/table1_proxy, then calibrun-report.
#   bash benchmarks/table1_proxy.sh /path/to/CIFAR-10-images   # data.format=folder
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: table1_proxy.sh CIFAR10_FOLDER}
BIN=${BIN:-.venv/bin}
COMMON="data.root=$ROOT data.format=folder data.train_subset=10000 model=resnet110 model.depth=8
  trainer.epochs=12 trainer.device=cpu trainer.progress=false run_name=table1_proxy"
run() { OMP_NUM_THREADS=1 $BIN/calibrun -m "$@" $COMMON > "outputs/logs/table1_proxy_$(echo "$*" | tr -c "[:alnum:]._\n" _).log" 2>&1; }
mkdir -p outputs/logs
# Two queues, one core each; the readings most in question first. λ = 0.078 is the summed-CE
# reading at batch 128 (10/128, written out: these runs were made before loss.lam_reading).
( run experiment=table1_ce data.augment=false
  run experiment=table1_gap_cap loss.lam=0.078 data.augment=false
  run experiment=table1_gap loss.lam=0.078 data.augment=false ) &
( run experiment=table1_gap_cap loss.lam=10 data.augment=false
  run experiment=table1_gap_cap loss.lam=10 loss.warmup_epochs=4 data.augment=false ) &
wait
$BIN/calibrun-report outputs/multirun/table1_proxy --out outputs/tables --name table1_proxy --calibrators none,temperature \
  --paper table1 --table-metrics accuracy,ece,mce,nll --grid-name table1_proxy_reliability.png
