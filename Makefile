# calibrun — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make demo / bench read CIFAR-10 from here; DATA_FORMAT=folder reads an image folder.
DATA_ROOT ?= data
DATA_FORMAT ?= torchvision
EPOCHS ?= 3

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-gpu demo bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

install: $(BIN)/.installed ## create .venv and install calibrun with its [dev] extra

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: install ## the offline CPU test suite (skips `slow` and `gpu` tests)
	$(BIN)/python -m pytest -q

test-slow: install ## the slow tests too (multiruns, non-editable install)
	$(BIN)/python -m pytest -q -m 'not gpu'

test-gpu: install ## tests that need CUDA
	$(BIN)/python -m pytest -q -m gpu

demo: install ## a short real run: CIFAR-10 (downloaded), ResNet-110, a few epochs on a subset
	$(BIN)/calibrun data=cifar10 data.root=$(DATA_ROOT) data.format=$(DATA_FORMAT) \
		data.train_subset=4000 data.test_subset=1000 data.val_size=1000 \
		model=resnet110 trainer=quick trainer.epochs=$(EPOCHS) run_name=demo
	@echo "Run folder: outputs/runs/cifar10/ce/demo (metrics.md, figures/)"

bench: install ## images/s of the device data pipeline against torchvision's DataLoader pipeline
	$(BIN)/python benchmarks/bench_data.py --root $(DATA_ROOT) --format $(DATA_FORMAT)

clean: ## remove the virtual environment and caches (keeps outputs/)
	rm -rf $(VENV) build dist *.egg-info
