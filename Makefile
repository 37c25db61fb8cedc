# slm_assist: `make demo` and `make test` set up a fresh machine (venv in .venv) and run.
SHELL := /bin/bash
PY := .venv/bin/python
DEMO ?= runs/demo
ARGS ?=

.PHONY: setup setup-numactl test test-fast demo lint pack score select bench bench-score bench-salt bench-compress bench-compress-demo clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -e '.[dev]'
	touch $@

# Optional, and the one target that changes the system (as root, with apt-get): numactl, which only the deepspeed
# launcher's --bind_cores_to_rank needs. setup, demo and test never run it.
setup-numactl:
	@if command -v numactl >/dev/null; then echo "numactl: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq numactl >/dev/null && echo "numactl: installed"; \
	else echo "numactl: install it with your system's package manager (sudo apt-get install numactl)"; exit 1; fi

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: setup
	@$(PY) -m pytest -q $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests ran"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	.venv/bin/ruff check slm_assist data_tools tests bench
	.venv/bin/lint-imports --no-cache --no-logo

# ---- Launch: every stage entry point runs under the deepspeed launcher (NUM_GPUS processes per node; on a CPU
# machine they are CPU processes). CONFIG= picks the YAML, ARGS= adds key=value overrides, DRY_RUN=1 prints the
# exact command instead of running it. Multi-node: HOSTFILE= (see configs/hostfile.example), NNODES=; SLURM:
# the *-slurm targets submit configs/slurm/launch.sbatch (srun + torchrun, rendezvous on the first node).
NUM_GPUS ?= 1
NNODES ?= 2
HOSTFILE ?= configs/hostfile.example
LAUNCHER ?= pdsh
DS := .venv/bin/deepspeed
DO = $(if $(DRY_RUN),@echo ,)
need = $(foreach v,$(1),$(if $($(v)),,$(error $@: set $(v)=..., e.g. make $@ $(v)=...)))
single = $(DO)$(DS) --num_gpus $(NUM_GPUS) $(if $(MASTER_PORT),--master_port $(MASTER_PORT) )--module $(1) $(CONFIG) $(ARGS)
multi = $(DO)$(DS) --hostfile $(HOSTFILE) --num_nodes $(NNODES) --num_gpus $(NUM_GPUS) --master_port $(or $(MASTER_PORT),29500) \
	--launcher $(LAUNCHER) --module $(1) $(CONFIG) $(ARGS)
slurm = $(DO)sbatch --nodes $(NNODES) --gpus-per-node $(NUM_GPUS) configs/slurm/launch.sbatch $(1) $(CONFIG) $(ARGS)

.PHONY: pretrain pretrain-multinode pretrain-slurm score-multinode score-slurm compress compress-multinode \
	compress-slurm eval push

pretrain: setup
	$(call need,CONFIG)$(call single,slm_assist.train)

pretrain-multinode: setup
	$(call need,CONFIG)$(call multi,slm_assist.train)

pretrain-slurm:
	$(call need,CONFIG)$(call slurm,slm_assist.train)

# Compress a pretrained LLM into a small student (progressive distillation; stages in the config).
compress: setup
	$(call need,CONFIG)$(call single,slm_assist.compress)

compress-multinode: setup
	$(call need,CONFIG)$(call multi,slm_assist.compress)

compress-slurm:
	$(call need,CONFIG)$(call slurm,slm_assist.compress)

# Score the packed data with the SLM (default: the demo config), one shard per process.
score: CONFIG ?= configs/demo/score.yaml
score: setup
	$(call single,data_tools.score)

score-multinode: setup
	$(call need,CONFIG)$(call multi,data_tools.score)

score-slurm:
	$(call need,CONFIG)$(call slurm,data_tools.score)

select: setup
	$(DO)$(PY) -m data_tools.select $(or $(CONFIG),configs/demo/select.yaml) $(ARGS)

# make eval MODEL=runs/demo/salt/final DATA="runs/demo/data runs/demo/cloze.jsonl"
eval: setup
	$(call need,MODEL)$(DO)$(PY) -m slm_assist.eval $(MODEL) $(DATA) $(ARGS)

# make push RUN=runs/demo/salt REPO=my-org/my-model [ARGS="--private --create-pr"]
push: setup
	$(call need,RUN REPO)$(DO)$(PY) -m slm_assist.hub push $(RUN)/final --repo-id $(REPO) $(ARGS)

# tokenizer -> pack -> SLM -> score -> select -> LLM baseline + SALT -> eval -> compress the LLM into a student
# (and the same student from scratch) -> report, all under $(DEMO). Re-running resumes finished runs instantly.
# DEMO_PACK_ARGS / DEMO_TASK_ARGS / DEMO_ARGS add overrides to the packing of the data / of the task data / to
# every training run; DEMO_COMPRESS picks the compress config (the test suite runs a shortened demo this way).
DEMO_PACK_ARGS ?=
DEMO_TASK_ARGS ?=
DEMO_ARGS ?=
DEMO_COMPRESS ?= configs/demo/compress.yaml
$(DEMO)/data/manifest.json: configs/demo/data.yaml | .venv/.installed
	$(PY) -m data_tools.pack configs/demo/data.yaml out_dir=$(DEMO)/data overwrite=true $(DEMO_PACK_ARGS)

$(DEMO)/task/manifest.json: configs/demo/task.yaml $(DEMO)/data/manifest.json | .venv/.installed
	$(PY) -m data_tools.pack configs/demo/task.yaml out_dir=$(DEMO)/task tokenizer.path=$(DEMO)/data/tokenizer \
	  overwrite=true $(DEMO_TASK_ARGS)

pack: setup $(DEMO)/data/manifest.json

demo: setup $(DEMO)/data/manifest.json $(DEMO)/task/manifest.json
	$(PY) -m slm_assist.train configs/demo/slm.yaml run_dir=$(DEMO)/slm data.path=$(DEMO)/data $(DEMO_ARGS)
	$(PY) -m data_tools.score configs/demo/score.yaml model=$(DEMO)/slm/final data=$(DEMO)/data \
	  out_dir=$(DEMO)/scores overwrite=true
	$(PY) -m data_tools.select configs/demo/select.yaml scores=$(DEMO)/scores out_dir=$(DEMO)/select overwrite=true
	$(PY) -m slm_assist.train configs/demo/llm.yaml run_dir=$(DEMO)/llm data.path=$(DEMO)/data $(DEMO_ARGS)
	$(PY) -m slm_assist.train configs/demo/salt.yaml run_dir=$(DEMO)/salt data.path=$(DEMO)/data \
	  distill.source.teachers=[$(DEMO)/slm/final] distill.data.selection=$(DEMO)/select/index.npy $(DEMO_ARGS)
	$(PY) -m data_tools.cloze $(DEMO)/data $(DEMO)/cloze.jsonl --examples 300
	for r in slm llm salt; do $(PY) -m slm_assist.eval $(DEMO)/$$r/final $(DEMO)/data $(DEMO)/cloze.jsonl \
	  --out $(DEMO)/$$r/eval.json || exit 1; done
	$(PY) -m slm_assist.compress $(DEMO_COMPRESS) run_dir=$(DEMO)/compress teacher=$(DEMO)/llm/final init.path=$(DEMO)/slm/final \
	  general_data=$(DEMO)/data task_data=$(DEMO)/task
	$(PY) -m slm_assist.train configs/demo/scratch.yaml run_dir=$(DEMO)/scratch data.path=$(DEMO)/task $(DEMO_ARGS)
	for r in compress/finetune compress/tsd scratch; do $(PY) -m slm_assist.eval $(DEMO)/$$r/final $(DEMO)/task \
	  $(DEMO)/data --speed --out $(DEMO)/$$r/eval.json || exit 1; done
	@echo; $(PY) -m slm_assist.report $(DEMO)/slm $(DEMO)/llm $(DEMO)/salt --data $(DEMO)/data \
	  --select $(DEMO)/select --compress $(DEMO)/compress --scratch $(DEMO)/scratch --out $(DEMO)/report.md \
	  --title "slm_assist demo: the full cycle on the embedded corpus"
	@echo "TensorBoard: .venv/bin/tensorboard --logdir $(DEMO)"

bench: setup
	$(PY) bench/trainer_throughput.py $(ARGS)

# Issue 13's SALT benchmark: screen every lever, then confirm the best over 3 seeds x 2 corpora (~4 h on 2 CPU
# cores with the default --jobs 2; resumable across sessions); ARGS=--quick for a <= 10 min test-scale run.
bench-salt: setup
	$(PY) bench/salt.py $(ARGS)

# Compression measured three ways (issue 25): ERNIE-Tiny's amortised general distillation at equal task steps on
# two tasks, Minitron's tokens to match a scratch student, and the full FLOP charge; the latent-stage sweep and the
# pruning ablations (~4 h on 2 CPU cores with --jobs 2; resumable, --seeds N adds seeds; --plan lists the runs).
# ARGS=--quick for a ~15 min test-scale run.
bench-compress: setup
	$(PY) bench/compress.py $(ARGS)

# The demo's compress step over 3 seeds (after `make demo`): the gap recovered each seed reaches (~10 min).
bench-compress-demo: setup
	$(PY) bench/compress_demo.py --demo $(DEMO) $(ARGS)

bench-score: setup
	$(PY) bench/score_throughput.py $(ARGS)

clean:
	rm -rf runs
