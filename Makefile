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

.PHONY: demo demo-full test install install-test model data clean-outputs

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

# Data is rebuilt only when missing (delete data/split to rebuild); both scripts are deterministic by seed.
data/split/stats.json: | model
	$(PYTHON) prepare_datasets.py
	$(PYTHON) split_datasets.py

data: data/split/stats.json

# The main job: DS-LoRA + SLSD and Seq-LoRA through T1..T5, then plots and the results table.
# Each training script resumes after its last finished stage, so an interrupted demo picks up where it was.
demo: data
	$(PYTHON) train_slsd_seq.py $(ARGS)
	$(PYTHON) train_seq_baselines.py --method seq_lora $(ARGS)
	$(PYTHON) plot_loss.py all $(ARGS)

# The longer comparison: every method, more steps and more generated samples per stage (hours on 2 CPU
# cores, minutes on a GPU). Its logs go to logs/full/ and checkpoints/full/, apart from the demo's.
FULL_ARGS ?= --max_steps_per_task 64 --metrics_max_samples 24 --eval_max_samples 96 --drift_num_probes 16 \
             --eval_fast_modes current,own_task,none \
             --log_dir logs/full --save_dir checkpoints/full
demo-full: data
	$(PYTHON) train_slsd_seq.py $(FULL_ARGS) $(ARGS)
	$(PYTHON) train_slsd_seq.py --use_slsd false $(FULL_ARGS) $(ARGS)
	for m in seq_lora replay ewc; do $(PYTHON) train_seq_baselines.py --method $$m $(FULL_ARGS) $(ARGS) || exit 1; done
	for t in T1_general T2_math T3_code T4_tool T5_safety; do \
	  $(PYTHON) train_single_task.py --task $$t $(FULL_ARGS) $(ARGS) || exit 1; done
	$(PYTHON) plot_loss.py all $(FULL_ARGS) $(ARGS)

test: install-test
	$(PYTHON) -m pytest -q tests

clean-outputs:  # the demo's logs and checkpoints (not the data or the model)
	rm -rf logs/*.jsonl logs/*.png logs/*.json logs/*.md logs/generations logs/full checkpoints/*/
