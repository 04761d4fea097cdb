# Set-up and checks. `make test` and `make run` work on a fresh machine: they create .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test run bench proto clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 first: the CPU build (pip's find-links on this kind of machine, else PyTorch's CPU index).
	$(PY) -m pip install --quiet torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install --quiet -e '.[test]' ninja==1.13.2
	$(PY) -m compute_service.attention --build
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m bench.benchmark --modes paged,contiguous,no-cache --model dummy:gpt2 --prompt-tokens 32 --new-tokens 500 --block-size 16 --num-blocks 256 --warmup 1 --runs 3

clean:
	rm -rf $(VENV) build *.egg-info
