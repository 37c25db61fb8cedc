# slm_assist: `make demo` and `make test` set up a fresh machine (venv in .venv) and run.
SHELL := /bin/bash
PY := .venv/bin/python
DEMO := runs/demo
ARGS ?=

.PHONY: setup test test-fast demo lint pack score select bench bench-score clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -e '.[dev]'
	@if command -v numactl >/dev/null; then echo "numactl: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq numactl >/dev/null && echo "numactl: installed") \
	  || echo "numactl: apt-get install failed; skipped (only deepspeed --bind_cores_to_rank needs it)"; \
	else echo "numactl: skipped (not root or no apt-get; only deepspeed --bind_cores_to_rank needs it)"; fi
	touch $@

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: setup
	@$(PY) -m pytest -q $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests ran"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	.venv/bin/ruff check slm_assist data_tools tests bench

# Tokenizer + packed dataset; rebuilt only when the data config changes.
$(DEMO)/data/manifest.json: configs/demo/data.yaml | .venv/.installed
	$(PY) -m data_tools.pack configs/demo/data.yaml overwrite=true

pack: setup $(DEMO)/data/manifest.json

# Score the packed data with the SLM, then select a subset (CONFIG= and ARGS= to change them).
score: setup
	$(PY) -m data_tools.score $(or $(CONFIG),configs/demo/score.yaml) $(ARGS)

select: setup
	$(PY) -m data_tools.select $(or $(CONFIG),configs/demo/select.yaml) $(ARGS)

# tokenizer -> pack -> SLM -> score -> select -> LLM -> summary. Re-running resumes finished runs instantly.
demo: setup $(DEMO)/data/manifest.json
	$(PY) -m slm_assist.train configs/demo/slm.yaml
	$(PY) -m data_tools.score configs/demo/score.yaml overwrite=true
	$(PY) -m data_tools.select configs/demo/select.yaml overwrite=true
	$(PY) -m slm_assist.train configs/demo/llm.yaml
	@echo; $(PY) -m slm_assist.report $(DEMO)/slm $(DEMO)/llm
	@echo "data: $(DEMO)/data   scores: $(DEMO)/scores   SALT_DS selection: $(DEMO)/select/report.md (+ hist_*.png)"
	@echo "TensorBoard: .venv/bin/tensorboard --logdir $(DEMO)"

bench: setup
	$(PY) bench/trainer_throughput.py $(ARGS)

bench-score: setup
	$(PY) bench/score_throughput.py $(ARGS)

clean:
	rm -rf runs
