#!/usr/bin/env bash
# Fetch, on a machine with the package registries, the wheels that calibrun needs on a
# GPU machine whose Python (3.12) has torch, torchvision, timm, pandas, matplotlib,
# scikit-learn, tensorboard, tabulate, filelock, joblib and pytest but nothing else of
# ours: Hydra, OmegaConf, ANTLR's runtime, the launchers, gdown and the build backend.
# They land in .whl/ (git-ignored through .git/info/exclude); benchmarks/gpu_session.sh
# installs them there. Usage: bash benchmarks/device_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pure=(hydra-core==1.3.2 omegaconf==2.3.0 hydra-joblib-launcher==1.2.0 hydra-submitit-launcher==1.2.0
      submitit==1.5.2 cloudpickle==3.1.1 gdown==5.2.0 beautifulsoup4==4.12.3 soupsieve==2.6
      hatchling==1.25.0 editables==0.5 pathspec==0.12.1 trove-classifiers==2024.10.21.16 pluggy==1.5.0)
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl "${pure[@]}"
# ANTLR's runtime ships as a source archive only: build its (pure Python) wheel here.
"$PYTHON" -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
