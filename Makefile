# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: install demo test test-fast lint bench clean fuzz gpu-check

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

# On a CUDA machine (docs/gpu.md): the tests marked `gpu` (the files that hold them) and benchmarks/gpu.py, under
# 10 minutes; output in benchmarks/results/gpu.json and gpu_pytest.log. `make gpu-check PY=python3` uses that
# Python as it is: no venv is created and nothing is installed.
GPU_DEPS := $(if $(filter command line,$(origin PY)),,$(STAMP))
gpu-check: $(GPU_DEPS)
	mkdir -p benchmarks/results
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
	$(PY) -m pytest -q -m gpu -rs -p no:cacheprovider $$(grep -rl "mark.gpu" tests --include="test_*.py") \
	  > benchmarks/results/gpu_pytest.log 2>&1; rc=$$?; cat benchmarks/results/gpu_pytest.log; \
	  $(PY) benchmarks/gpu.py && exit $$rc

clean:
	rm -rf $(VENV) runs benchmarks/results/*.json
