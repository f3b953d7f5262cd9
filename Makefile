# liteformer: every target calls the CLI (`python -m pipeline <stage>`). Each stage decides itself whether
# it is up to date: manifest.json in the run directory holds the config and input checksums it was made
# from, so an unchanged stage is skipped, a changed config or data file reruns exactly the stages it
# affects, and `make compress` after `make train` does not retrain.
#   make train DATA=../shared/data/sst2            (DATA: a data directory; default: GLUE SST-2 download)
#   make train SET="train.epochs=3 model.num_layers=1"
export TF_USE_LEGACY_KERAS := 1

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= params.yaml
DATA   ?=
RUN    ?= $(if $(DATA),$(notdir $(abspath $(DATA))),SST-2)
SET    ?=

ARGS      = --config $(CONFIG) $(foreach s,$(SET),--set $(s))
DATA_ARG  = $(if $(DATA),--data $(DATA),)

.PHONY: venv data pretrain train distill evaluate compress benchmark report tensorboard test test-fast test-e2e clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# Its metadata pins absl-py~=1.2 and numpy~=1.23 (conflicting with TF 2.21 and mediapipe); it runs with theirs.
	$(PY) -m pip install --quiet --no-deps tensorflow-model-optimization==0.8.1
	touch $(STAMP)

data: | $(STAMP)
	$(PY) -m pipeline data $(DATA_ARG) --run $(RUN) $(ARGS)

pretrain: data
	$(PY) -m pipeline pretrain --run $(RUN) $(ARGS)

train: data
	$(PY) -m pipeline train --run $(RUN) $(ARGS)

evaluate: train
	$(PY) -m pipeline evaluate --model saved_models/$(RUN) --data data/processed/$(RUN)/dev.jsonl \
		--out saved_models/$(RUN)/eval $(ARGS)

distill: train
	$(PY) -m pipeline distill --run $(RUN) $(ARGS)

compress: train
	$(PY) -m pipeline compress --run $(RUN) $(ARGS)

benchmark: compress
	$(PY) -m pipeline benchmark --run $(RUN) $(ARGS)

report: benchmark
	$(PY) -m pipeline report --run $(RUN) $(ARGS)

tensorboard: | $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs

test: | $(STAMP)
	$(PY) -m pytest -q

test-fast: | $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

test-e2e: | $(STAMP)
	$(PY) -m pytest -q -m e2e

clean:
	rm -rf data/processed saved_models/* runs
	touch saved_models/.gitkeep
