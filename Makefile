# Every target creates .venv and installs on first use; the stamp is rebuilt when a requirement file changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNS ?= runs
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv check lint train_smoke train_quick train_full train_ddp test bench corpus tensorboard dashboard plotly_bundle clean distclean

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

check: $(STAMP)
	$(PY) -m rlhf_core.train.check

train_smoke: $(STAMP)
	$(PY) train.py --epochs 2 --steps_per_epoch 6 --batch_size 2 --max_new_tokens 10 --run_dir $(RUNS)/smoke --overwrite

train_quick: $(STAMP)
	$(PY) train.py --epochs 5 --steps_per_epoch 10 --batch_size 4 --max_new_tokens 15 --run_dir $(RUNS)/quick --overwrite

train_full: $(STAMP)
	$(PY) train.py --epochs 10 --steps_per_epoch 15 --batch_size 8 --max_new_tokens 20 --run_dir $(RUNS)/full --overwrite --save_model

train_ddp: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 train.py --epochs 2 --steps_per_epoch 6 --batch_size 2 --max_new_tokens 10 --run_dir $(RUNS)/ddp --overwrite

# Style and types, configured in pyproject.toml ([tool.ruff], [tool.mypy]); CI runs this before the tests.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# Two pytest-xdist workers; tests/conftest.py's scheduler keeps each file, and each group of tests that start
# processes of their own (Ray, torchrun ranks, Chromium), on one worker, and queues the groups first (kept in that
# order by --no-loadscope-reorder). TEST_WORKERS=0 runs the tests in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --no-loadscope-reorder

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# The corpus of real runs (docs/corpus.md): ~25-40 min on a shared 2-core CPU; runs go to benchmarks/corpus/runs/
# (ignored), the labelled copy to benchmarks/corpus/corpus.tar.xz and a few short runs to tests/fixtures/real_runs.
corpus: $(STAMP)
	$(PY) -m benchmarks.corpus.generate --jobs 2

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(RUNS) --host 127.0.0.1

dashboard: $(STAMP)
	$(VENV)/bin/rlhfkit dashboard --runs $(RUNS)

# Rebuilds the dashboard's partial plotly.js (dashboard/assets/plotly-rlhfkit.min.js, committed); needs node and npm.
plotly_bundle:
	cd dashboard/plotly_bundle && npm ci --no-audit --no-fund && node build.js

clean:
	find $(RUNS) -mindepth 1 -maxdepth 1 ! -name .gitkeep -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
	rm -rf .pytest_cache

distclean: clean
	rm -rf $(VENV)
