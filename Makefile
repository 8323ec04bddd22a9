# The two commands a new user needs: `make demo` and `make test`. Each creates .venv and installs
# the pinned stack on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-torchrec.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt -r requirements-dev.txt
	# torchrec's metadata names the CUDA fbgemm-gpu; fbgemm-gpu-cpu from requirements.txt replaces it.
	$(PY) -m pip install --no-deps -r requirements-torchrec.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mlet demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
