# Two commands do all the set-up on a fresh machine:
#   make demo   venv + install + default model + data + DS-LoRA/SLSD vs Seq-LoRA + plots + results table
#   make test   venv + install (with test extras) + the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test
ARGS    ?=

.PHONY: demo test install install-test model data train-slsd train-seq plots clean-outputs

$(PYTHON):
	$(PY) -m venv $(VENV)

$(STAMP): requirements.txt | $(PYTHON)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(TSTAMP): requirements-test.txt $(STAMP)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $@

install: $(STAMP)
install-test: $(TSTAMP)

model: install
	$(PYTHON) utils_model.py

data: model
	$(PYTHON) prepare_datasets.py $(ARGS)
	$(PYTHON) split_datasets.py $(ARGS)

demo: model
	@echo "The training scripts have not landed yet: the default model is materialized under pretrained_models/."

test: install-test
	$(PYTHON) -m pytest -q tests

clean-outputs:
	rm -rf logs/*.jsonl logs/*.png logs/*.json logs/*.md checkpoints/*/
