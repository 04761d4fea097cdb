# Set-up and checks. `make test` and `make run` work on a fresh machine: they create .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_STAMP := rpc/.generated
KERNEL_STAMP := $(VENV)/.kernel-built

.PHONY: install test run bench proto clean compose-test peers

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 first: the CPU build (pip find-links here; elsewhere add --index-url https://download.pytorch.org/whl/cpu).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The C++ decode kernel: where a C++ compiler is installed, a kernel that does not build fails here.
$(KERNEL_STAMP): $(wildcard compute_service/csrc/*.cpp compute_service/csrc/*.h) compute_service/native.py | $(STAMP)
	$(PY) -m compute_service.native --build
	touch $(KERNEL_STAMP)

# The gRPC stubs: generated into the ignored rpc/ package, never edited by hand.
$(PROTO_STAMP): $(wildcard protos/rpc/*/*.proto protos/rpc/*/*/*.proto) protos/generate.sh | $(STAMP)
	PYTHON=$(PY) protos/generate.sh
	touch $(PROTO_STAMP)

proto: $(PROTO_STAMP)

install: $(STAMP) $(PROTO_STAMP) $(KERNEL_STAMP)

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

# The three services as local processes, a demo generation, then serving until Ctrl-C.
run: install
	$(PY) -m deploy.run_local

# docker-compose.yml brought up for real with podman (Debian: apt-get install -y podman
# runc debootstrap docker-compose catatonit; .ci/run does). Container storage stays in a temporary folder.
compose-test: install
	$(PY) -m deploy.compose_test

bench: install
	$(PY) -m bench.benchmark --modes paged,contiguous,no-cache --model dummy:gpt2 --prompt-tokens 32 --new-tokens 500 --block-size 16 --num-blocks 256 --warmup 1 --runs 3

clean:
	rm -rf $(VENV) build *.egg-info rpc

# Benchmark peers (llama.cpp compiled from its sdist: a few minutes; never part of `make test`).
# Then llama.cpp's own llama-server from the same sdist, into ~/.cache/paged-nanogpt (bench/build_llama_server.py).
peers: install
	$(PY) -m pip install --quiet -e '.[peers]'
	$(PY) -m bench.build_llama_server
