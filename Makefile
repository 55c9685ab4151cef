# `make demo` and `make test` each set everything up on a fresh machine (idempotent).
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.a2q-installed
DEMO_MODEL ?= models/fmnist_cnn_w4a4.onnx
OUT     ?= out

.PHONY: setup demo test fuzz bench bench-quick clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	# finn-plus pins versions that conflict with torch 2.13: install it alone, its runtime deps are in requirements.txt
	$(VPY) -m pip install -q --no-deps finn-plus==1.6.1
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@# Fashion-MNIST comes from a Debian package (real data, installed offline afterwards)
	@test -d /usr/share/datasets/fashion-mnist || { (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "warning: could not install dataset-fashion-mnist (need root + apt)"; }
	@touch $(STAMP)

demo: setup
	bash scripts/demo.sh $(DEMO_MODEL) $(OUT)

test: setup
	$(VPY) -m pytest -n 2 -q tests

# Soundness fuzzer: N random models through analyze/annotate/verify/project, checked by qonnx execution.
# FUZZ_ARGS e.g. "--seed 1 --save fuzz-findings" (see python -m scripts.fuzz --help).
N ?= 1000
FUZZ_ARGS ?=
fuzz: setup
	$(VPY) -m scripts.fuzz --examples $(N) $(FUZZ_ARGS)

bench: setup
	$(VPY) -m bench.run_all

bench-quick: setup
	$(VPY) -m bench.run_all --quick

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
