# calibrun — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DATA=cifar10_sample (pacs_sample for the PACS targets) swaps in the sample bundled with
# calibrun, which needs no download.
DATA ?=
# Where the data is (default: each data config's own, data/ or data/PACS); for CIFAR,
# DATA_FORMAT=folder reads an image folder instead of torchvision's release.
DATA_ROOT ?=
DATA_FORMAT ?=
# TRAINER=quick swaps the trainer preset of any target.
TRAINER ?=
# Empty: each target's own default (the demo preset's 40, the full recipe for reproductions).
EPOCHS ?=
# Seeds 0..SEEDS-1; empty: each target's own default (1; 5 for reproduce-pacs, whose paper
# averages five runs).
SEEDS ?=
# Extra overrides passed to every calibrun call, e.g. ARGS="model.depth=20 trainer.device=cuda".
# SHIFT=cifar10c evaluates reproduce-baselines' runs under that shift too.
SHIFT ?=
ARGS ?=
# Options of benchmarks/bench_gpu.py, e.g. BENCH_ARGS="--models resnet110 --repeats 5".
BENCH_ARGS ?=
# λ of gap and gap_cap in reproduce-table1 (the paper's 10), and what it weighs the gap
# against: summed_ce (a cross-entropy summed over the batch, λ/batch size on calibrun's mean;
# the measured default, docs/reproductions/table1.md) or mean_ce (the batch-mean cross-entropy).
LAM ?= 10
READING ?= summed_ce
# The value ARGS gives a key (the last one wins, as in Hydra); empty when it gives none.
arg_value = $(lastword $(patsubst $(1)=%,%,$(filter $(1)=%,$(ARGS))))
seeds_or = $(shell seq -s, 0 $$(($(or $(SEEDS),$(1)) - 1)))
seed_list = $(call seeds_or,1)
epochs_arg = $(if $(EPOCHS),trainer.epochs=$(EPOCHS))
root_arg = $(if $(DATA),data=$(DATA)) $(if $(DATA_ROOT),data.root=$(DATA_ROOT))
data_args = $(root_arg) $(if $(DATA_FORMAT),data.format=$(DATA_FORMAT)) $(if $(TRAINER),trainer=$(TRAINER))
pacs_args = $(root_arg) $(if $(TRAINER),trainer=$(TRAINER))

.DEFAULT_GOAL := help
.PHONY: help install test lint test-slow test-gpu demo bench bench-intervals bench-calibrators bench-corrupt bench-gpu reproduce-table1 reproduce-pacs pacs-vit reproduce-ls reproduce-baselines sweep-lambda tune-lambda report docs clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

install: $(BIN)/.installed ## create .venv and install calibrun with its [dev] extra

# No pip cache: torch's CUDA wheels alone are several GB, and a second copy in the cache
# has filled a CI machine's disk. TORCH_INDEX=cpu installs torch's CPU-only build first
# (docs/getting-started.md), any other value is taken as the index URL to install torch from.
TORCH_INDEX ?=
torch_index_url = $(if $(filter cpu,$(TORCH_INDEX)),https://download.pytorch.org/whl/cpu,$(TORCH_INDEX))
# torch's and torchvision's ranges, as pyproject.toml declares them.
torch_reqs = $(shell grep -oE '"torch(vision)?[<>=!~][^"]*"' pyproject.toml)
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --upgrade pip
	@echo "Installing calibrun and torch ($(if $(TORCH_INDEX),from $(torch_index_url),the default CUDA build: about 3 GB to download and 6 GB on disk; TORCH_INDEX=cpu for the CPU-only build)). This takes minutes; pip's progress follows."
	$(if $(TORCH_INDEX),$(BIN)/pip install --no-cache-dir --progress-bar on --index-url $(torch_index_url) $(torch_reqs))
	$(BIN)/pip install --no-cache-dir --progress-bar on -e '.[dev]'
	touch $@
	@echo "Installed. In a new shell, run 'source $(VENV)/bin/activate' to put calibrun on the PATH (or call $(BIN)/calibrun)."

# pytest-xdist workers: one per core (each worker's torch gets its share of the threads, tests/conftest.py).
TEST_WORKERS ?= auto
test: install ## the offline CPU test suite on every core (skips `slow` and `gpu` tests); TEST_WORKERS=0 runs it in one process
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: install ## ruff and mypy on calibrun/, pyflakes on tests/ and benchmarks/ (settings in pyproject.toml)
	$(BIN)/ruff check calibrun
	$(BIN)/ruff check --select F tests benchmarks
	$(BIN)/mypy

test-slow: install ## the slow tests too (multiruns, non-editable install)
	$(BIN)/python -m pytest -q -m 'not gpu'

test-gpu: install ## tests that need CUDA
	$(BIN)/python -m pytest -q -m gpu

demo: install ## a real run offline: the bundled CIFAR-10 sample, ResNet-8, all calibrators (about 2 min on 2 idle cores)
	$(BIN)/calibrun experiment=demo $(data_args) $(epochs_arg) run_name=demo $(ARGS)
	@echo "Table:   outputs/runs/$(or $(DATA),cifar10_sample)/ce/demo/metrics.md"
	@echo "Figures: outputs/runs/$(or $(DATA),cifar10_sample)/ce/demo/figures/"

bench-gpu: install ## one training epoch of ResNet-110/20/18 and PACS ResNet-18: calibrun vs the usual DataLoader pipeline vs a bare loop (outputs/bench/)
	$(BIN)/python benchmarks/bench_gpu.py $(BENCH_ARGS)

bench-intervals: install ## seconds the bootstrap intervals add to a 10,000-image run with 7 calibrators, against the naive resampling loop
	$(BIN)/python benchmarks/bench_bootstrap.py

bench-calibrators: install ## every calibrator's fit time at 10,000×10, 50,000×1,000 and 1,000,000×100 beside netcal's (pip install netcal for its column) -> outputs/bench/calibrators.csv
	$(BIN)/python benchmarks/bench_calibrators.py $(BENCH_ARGS)

bench-corrupt: install ## the 19 corruptions beside the reference code on 500 CIFAR images; BENCH_ARGS="--robustness GIT_DIR --imagecorruptions FILE" (see the script)
	$(BIN)/python benchmarks/bench_corrupt.py $(BENCH_ARGS)

bench: install ## images/s of the device data pipeline against torchvision's DataLoader pipeline
	$(BIN)/python benchmarks/bench_data.py $(if $(DATA_ROOT),--root $(DATA_ROOT) --format $(or $(DATA_FORMAT),torchvision))

# Table 1's table caption: the network (ARGS="model=resnet110" swaps it) and the reading of λ.
table1_model = $(or $(call arg_value,model),gapcap_net)
lam_reading_summed_ce = read against a cross-entropy summed over the batch (loss.lam_reading=summed_ce: λ/batch size beside the mean cross-entropy)
lam_reading_mean_ce = read against the batch-mean cross-entropy (loss.lam_reading=mean_ce)
table1_network = $(strip model=$(table1_model) $(filter model.%,$(ARGS)))
table1_caption = Network: $(table1_network)$(if $(filter gapcap_net,$(table1_model)), (the gap+cap paper's network)). \
	gap and gap_cap: λ = $(LAM), $(or $(lam_reading_$(READING)),loss.lam_reading=$(READING)).
# ce has no loss.lam, so it runs apart; then one call per λ experiment, because Hydra checks
# a non-swept loss.lam against the config composed without the swept keys (loss=ce there).
reproduce-table1: install ## gap+cap Table 1: CE, CE+gap, capped CE+gap (λ=LAM, default 10) on CIFAR-10, the paper's network -> outputs/tables/table1.md, figure3.png
	$(BIN)/calibrun -m experiment=table1_ce seed=$(seed_list) $(data_args) \
		$(epochs_arg) trainer.progress=false run_name=table1 $(ARGS); status=$$?; \
	for experiment in table1_gap table1_gap_cap; do \
		$(BIN)/calibrun -m experiment=$$experiment loss.lam=$(LAM) loss.lam_reading=$(READING) seed=$(seed_list) $(data_args) \
			$(epochs_arg) trainer.progress=false run_name=table1 $(ARGS) || status=1; \
	done; \
	$(BIN)/calibrun-report outputs/multirun/table1 --out outputs/tables --name table1 --calibrators none \
		--paper table1 --table-metrics accuracy,ece,mce --grid-name figure3.png --caption "$(table1_caption)" \
		&& exit $$status

# The PACS captions say what ran: TRAINER replaces the protocol's trainer=jigen (and its
# best-validation-epoch weights), ARGS="model.pretrained=false" its pretrained weights.
comma := ,
scratch = $(filter false False,$(call arg_value,model.pretrained))
pacs_trainer = $(if $(TRAINER),trainer=$(TRAINER) in place of the protocol's trainer=jigen,trainer=jigen \
	(lr 0.004 as in the NTS paper)$(comma) the weights of the best validation epoch)
pacs_caption = $(if $(scratch),ResNet-18 trained from scratch (model.pretrained=false),ImageNet-pretrained \
	ResNet-18), $(pacs_trainer), JiGen's validation split \
	(data.split=jigen, 10% of each source domain)$(if $(DATA), on data=$(DATA))$(if $(ARGS),; extra overrides: $(ARGS)).
reproduce-pacs: install ## PACS: 4 targets x {ce, nts λ=0.5, nts λ=1} x SEEDS (default 5) -> outputs/tables/pacs.md
	$(BIN)/calibrun -m experiment=pacs_ce data.target=art_painting,cartoon,photo,sketch seed=$(call seeds_or,5) \
		$(pacs_args) $(epochs_arg) trainer.progress=false run_name=pacs $(ARGS); ce=$$?; \
	$(BIN)/calibrun -m experiment=pacs_nts loss.lam=0.5,1 data.target=art_painting,cartoon,photo,sketch \
		seed=$(call seeds_or,5) $(pacs_args) $(epochs_arg) trainer.progress=false run_name=pacs $(ARGS); status=$$?; \
	$(BIN)/calibrun-report outputs/multirun/pacs --out outputs/tables --name pacs --calibrators none \
		--paper pacs --pivot data.target --table-metrics accuracy,ece --grid-name pacs_reliability.png \
		--caption "$(pacs_caption)" && exit $$((ce | status))

vit_name = $(or $(call arg_value,model.name),ViT-S/16)
pacs_vit_caption = PACS with timm's $(vit_name) (experiment=pacs_vit: $(if $(scratch),trained from scratch,ImageNet-21k pretrained), \
	$(or $(call arg_value,data.image_size),224) px) beside ResNet-18 (pacs_ce, pacs_nts: the runs of make \
	reproduce-pacs, where present), with $(pacs_trainer) and JiGen's validation split (data.split=jigen)$(if \
	$(DATA), on data=$(DATA))$(if $(ARGS),; extra overrides of the ViT runs: $(ARGS)). Minderer et al. 2021 \
	found ViTs better calibrated than CNNs.
pacs-vit: install ## PACS with a ViT-S/16 (timm) in place of ResNet-18, beside reproduce-pacs's runs -> outputs/tables/pacs_vit.md
	$(BIN)/calibrun -m experiment=pacs_vit data.target=art_painting,cartoon,photo,sketch seed=$(call seeds_or,5) \
		$(pacs_args) $(epochs_arg) trainer.progress=false run_name=pacs $(ARGS); status=$$?; \
	$(BIN)/calibrun-report outputs/multirun/pacs --out outputs/tables --name pacs_vit --calibrators none,temperature \
		--pivot data.target --table-metrics accuracy,ece --grid-name pacs_vit_reliability.png \
		--caption "$(pacs_vit_caption)" && exit $$status

# Müller et al. 2019 Table 3's caption: the network (ARGS="model.depth=8" shrinks it) and the data actually used.
ls_depth = $(or $(call arg_value,model.depth),56)
ls_caption = Müller et al. 2019 (When does label smoothing help?), Table 3 setting: CIFAR ResNet-$(ls_depth) \
	(model=resnet110 model.depth=$(ls_depth)) on data=$(or $(DATA),cifar100); cross-entropy against label \
	smoothing α = 0.05 with Müller's α/K on every class (loss.spread=all); 15 equal-width ECE bins; T fitted on \
	the validation split; trainer=$(or $(TRAINER),default)$(if $(EPOCHS), trainer.epochs=$(EPOCHS))$(if $(ARGS),; extra overrides: $(ARGS)). The paper columns are its CIFAR-100 ResNet-56 numbers.
reproduce-ls: install ## Müller et al. 2019 Table 3: ResNet-56 on CIFAR-100, CE (+ temperature scaling) vs label smoothing α=0.05 -> outputs/tables/ls.md
	$(BIN)/calibrun -m experiment=ls_ce,ls_smooth seed=$(seed_list) $(data_args) \
		$(epochs_arg) trainer.progress=false run_name=ls $(ARGS); status=$$?; \
	$(BIN)/calibrun-report outputs/multirun/ls --out outputs/tables --name ls --calibrators none,temperature \
		--paper ls --table-metrics accuracy,ece,nll,temperature.T --grid-name ls_reliability.png \
		--caption "$(ls_caption)" && exit $$status

# The baselines table: one preset per loss (conf/experiment/baseline_*.yaml), one recipe.
baseline_experiments = $(subst $(space),$(comma),$(sort $(basename $(notdir $(wildcard conf/experiment/baseline_*.yaml)))))
space := $(subst ,, )
baselines_caption = Train-time calibration baselines under one recipe: data=$(or $(DATA),cifar10), model=resnet110$(if \
	$(filter model.%,$(ARGS)), $(filter model.%,$(ARGS))), trainer=$(or $(TRAINER),default)$(if $(EPOCHS), trainer.epochs=$(EPOCHS)), \
	seeds $(call seeds_or,3), 15-bin metrics, T fitted on the validation split$(if $(SHIFT),$(comma) shift=$(SHIFT))$(if \
	$(ARGS),; extra overrides: $(ARGS)). Each loss at its paper's CIFAR-10 hyperparameters \
	(docs/reproductions/baselines.md). Paper columns: Mukhoti et al. 2020's CIFAR-10 ResNet-110 rows (test error and ECE before/after \
	temperature scaling, 15 bins, 350 epochs), from the tables of github.com/torrvision/focal_calibration's README; \
	no published CIFAR-10 ResNet-110 number was found for DCA, MDCA, MbLS or AdaFocal, so those are left empty.
reproduce-baselines: install ## every train-time baseline (CE, Brier, MMCE, LS, FL-3, FLSD-53, DCA, MDCA, MbLS, AdaFocal) on CIFAR-10 ResNet-110, SEEDS (default 3) -> outputs/tables/baselines.md
	$(BIN)/calibrun -m experiment=$(baseline_experiments) seed=$(call seeds_or,3) $(data_args) $(epochs_arg) \
		$(if $(SHIFT),shift=$(SHIFT)) trainer.progress=false run_name=baselines $(ARGS); status=$$?; \
	$(BIN)/calibrun-report outputs/multirun/baselines --out outputs/tables --name baselines --calibrators none,temperature \
		--paper baselines --keys experiment,loss --table-metrics accuracy,ece,ada_ece,nll --grid-name baselines_reliability.png \
		--caption "$(baselines_caption)" && exit $$status

sweep-lambda: install ## gap_cap over λ in {0, 0.1, 1, 3, 10, 30} on CIFAR-10, then the report
	$(BIN)/calibrun -m loss=gap_cap loss.lam=0,0.1,1,3,10,30 seed=$(seed_list) $(data_args) $(epochs_arg) \
		trainer.progress=false run_name=sweep_lambda $(ARGS); status=$$?; \
	$(BIN)/calibrun-report outputs/multirun/sweep_lambda && exit $$status

# Trials of tune-lambda (Optuna, hydra/sweeper=tune).
TRIALS ?= 20
tune-lambda: install ## tune gap_cap's λ with Optuna on the validation NLL after temperature scaling (TRIALS, default 20), then the report of the trials
	$(BIN)/calibrun -m hydra/sweeper=tune hydra.sweeper.n_trials=$(TRIALS) loss=gap_cap 'loss.lam=tag(log,interval(0.1,100))' \
		objective.metric=nll objective.calibrator=temperature seed=$(seed_list) $(data_args) $(epochs_arg) \
		trainer.progress=false run_name=tune_lambda $(ARGS); status=$$?; \
	$(BIN)/calibrun-report outputs/multirun/tune_lambda --out outputs/tables --name tune_lambda \
		--calibrators temperature --table-metrics nll,ece,accuracy \
		--caption "Optuna trials over λ of gap_cap, minimising the validation NLL after temperature scaling (objective.metric=nll); the table shows the test split. Best trial: outputs/multirun/tune_lambda/optimization_results.yaml." \
		&& exit $$status

report: install ## aggregate run folders: make report RUNS="outputs/multirun/<sweep> ..."
	$(BIN)/calibrun-report $(or $(RUNS),outputs/multirun)

docs: install ## the documentation site (mkdocs.yml, docs/) -> site/; warnings are errors (mkdocs build --strict)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean: ## remove the virtual environment and caches (keeps outputs/)
	rm -rf $(VENV) build dist *.egg-info
