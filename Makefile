# Two commands do all the set-up on a fresh machine:
#   make demo   venv + install + default model + data + DS-LoRA+SLSD with every score, its control (DS-LoRA
#               without SLSD) on loss and drift + plots + results table
#   make test   venv + install (with test extras) + the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test
ARGS    ?=

.PHONY: demo demo-full compare slsd-ablation kd-lambda test install install-test model data clean-outputs

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

# The main job: DS-LoRA + SLSD through T1..T5 with every score (loss; knowledge and format, generated task scores
# on the cells the CL metrics read; drift; after the last stage also the own_task, none and routed views), then its
# control on loss and drift (what the SLSD claim is measured on; --bench_metrics false skips generation and
# knowledge, most of the evaluation's time), then plots and the table:
#   ds_lora       the same script without SLSD (what SLSD adds is the difference from this run)
# The baselines (Seq-LoRA at r=8 and at DS-LoRA's capacity r=16, replay, EWC, ...) run in demo-full and the
# comparison; the 30-minute budget of the demo on 2 CPU cores has no room for them.
# The probe-KL diagnostic (two no-grad passes per stage) is left to `make kd-lambda`.
# Each training script resumes after its last finished stage, so an interrupted demo picks up where it was.
R16     := --method seq_lora --lora_r 16 --lora_alpha 32 --run_name seq_lora_r16
ALL_LAYERS := --method seq_lora --num_frozen_layers 0 --run_name seq_lora_all_layers
CONTROL := --bench_metrics false
demo: data
	$(PYTHON) train_slsd_seq.py --probe_kl_log false $(ARGS)
	$(PYTHON) train_slsd_seq.py --use_slsd false $(CONTROL) $(ARGS)
	$(PYTHON) plot_loss.py all $(ARGS)

# The longer comparison: every method, more steps and more generated samples per stage (hours on 2 CPU
# cores, minutes on a GPU). Its logs go to logs/full/ and checkpoints/full/, apart from the demo's. Besides the
# methods, two named Seq-LoRA configurations (train_seq_baselines.NAMED_RUNS checks their settings):
#   seq_lora_r16         Seq-LoRA at DS-LoRA's capacity (r=16, alpha 32)
#   seq_lora_all_layers  the layer-freezing control: Seq-LoRA with adapters on all layers (--num_frozen_layers 0)
#                        against the default upper half (15 of SmolLM2's 30 layers frozen); Spurious Forgetting
#                        (ICLR 2025) found that freezing the bottom layers kept far more of the first task
FULL_ARGS ?= --max_steps_per_task 64 --gen_rows_per_task 64 --knowledge_rows_per_task 128 --eval_max_samples 96 \
             --drift_num_probes 16 --recovery_probe true \
             --eval_fast_modes current,own_task,none \
             --log_dir logs/full --save_dir checkpoints/full
demo-full: data
	$(PYTHON) train_slsd_seq.py $(FULL_ARGS) $(ARGS)
	$(PYTHON) train_slsd_seq.py --use_slsd false $(FULL_ARGS) $(ARGS)
	for m in seq_lora replay ewc ilora olora; do $(PYTHON) train_seq_baselines.py --method $$m $(FULL_ARGS) $(ARGS) || exit 1; done
	$(PYTHON) train_seq_baselines.py $(R16) $(FULL_ARGS) $(ARGS)
	$(PYTHON) train_seq_baselines.py $(ALL_LAYERS) $(FULL_ARGS) $(ARGS)
	for t in T1_general T2_math T3_code T4_tool T5_safety; do \
	  $(PYTHON) train_single_task.py --task $$t $(FULL_ARGS) $(ARGS) || exit 1; done
	$(PYTHON) plot_loss.py all $(FULL_ARGS) $(ARGS)

# The full comparison (issue 15, compare.py): every method and named configuration x seeds 42-44 x the forward and
# the reverse task order, each run timed, then one aggregate: logs/compare/results.md (mean +- std over seeds, the
# change between orders, wall time, peak memory), ap_bwt.png and loss_heatmaps.png. Resumable: finished runs are
# skipped. `make compare ARGS=--quick` is the short version (4 steps per task, seed 42); ARGS also takes config
# overrides for every run (e.g. --preset paper --model_name /path/to/llama-2-7b-hf JOBS=1). Two (order, seed) folders
# run at a time, each child with cpu_count / JOBS threads (JOBS=1: one run at a time with every thread).
JOBS    ?= 2
compare: data
	$(PYTHON) compare.py --jobs $(JOBS) $(ARGS)

# SLSD against its control over seeds (issue 10): DS-LoRA alone, DS-LoRA + SLSD with the full teacher and with the
# slow teacher, seeds 42-44, loss matrices and drift (no bench generation: --bench_metrics false), then the
# mean +- std table (logs/slsd_ablation/seeds_summary.md). Resumable like every run; about 70 min on 2 CPU cores.
SEEDS   ?= 42 43 44
ABL     := --bench_metrics false --probe_kl_log false
slsd-ablation: data
	for s in $(SEEDS); do \
	  $(PYTHON) train_slsd_seq.py --use_slsd false $(ABL) --seed $$s --log_dir logs/slsd_ablation/seed$$s --save_dir checkpoints/slsd_ablation/seed$$s $(ARGS) || exit 1; \
	  $(PYTHON) train_slsd_seq.py $(ABL) --seed $$s --log_dir logs/slsd_ablation/seed$$s --save_dir checkpoints/slsd_ablation/seed$$s $(ARGS) || exit 1; \
	  $(PYTHON) train_slsd_seq.py $(ABL) --slsd_teacher slow --run_name slsd_teacher_slow --seed $$s --log_dir logs/slsd_ablation/seed$$s --save_dir checkpoints/slsd_ablation/seed$$s $(ARGS) || exit 1; \
	done
	$(PYTHON) summarize_seeds.py --log_root logs/slsd_ablation --control ds_lora

# How far KD holds the student to its teacher as kd_lambda grows: T1 -> T2, seed 42, KL(teacher || student) on the
# probe buffer at each stage's start and end (train-log rows with split probe_kl).
kd-lambda: data
	for l in 0 1 3; do \
	  $(PYTHON) train_slsd_seq.py --tasks T1_general,T2_math --run_metrics false --kd_lambda $$l --run_name slsd_l$$l \
	    --log_dir logs/kd_lambda/seed42 --save_dir checkpoints/kd_lambda $(ARGS) || exit 1; done

test: install-test
	$(PYTHON) -m pytest -q tests

clean-outputs:  # the demo's logs and checkpoints (not the data or the model)
	rm -rf logs/*.jsonl logs/*.png logs/*.json logs/*.md logs/generations logs/full checkpoints/*/
