# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: install demo test test-fast lint bench clean fuzz

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==26.3
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m tessera demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# every decoder under hypothesis with a fixed seed and a larger budget than the normal test run's short pass
fuzz: $(STAMP)
	TESSERA_FUZZ_EXAMPLES=$${TESSERA_FUZZ_EXAMPLES:-2000} $(PY) -m pytest -q tests/fuzz -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check tessera tests benchmarks
	$(PY) -m mypy tessera

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs benchmarks/results/*.json
