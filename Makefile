# Two entry points (see README): `make demo` and `make test`. Both go through `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel this kind of machine carries; plain `torch` pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench clean image-test

$(BIN)/actex: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/actex

install: $(BIN)/actex

demo: install
	$(BIN)/actex demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/reader.py

# Build the image with podman from a Debian base made here by debootstrap (no registry is
# needed; run as root), then run `actex demo` in it with no network.
IMAGE ?= localhost/actex:cpu
IMAGE_BASE ?= localhost/actex-base:bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# Machines like the test hosts: crun refuses their hybrid cgroups (runc works), containers
# may not raise their open-file and process limits, and pip reaches PyPI through a proxy
# whose CA only the host's bundle holds. Elsewhere: make image-test PODMAN=podman PODMAN_FLAGS= BUILD_FLAGS=
PODMAN ?= podman --runtime runc
PODMAN_FLAGS ?= --ulimit nofile=1024:1024 --ulimit nproc=4096:4096
BUILD_FLAGS ?= --network host --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro

image-test:
	$(PODMAN) image exists $(IMAGE_BASE) || { \
	  rm -rf build/image-base && \
	  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm build/image-base $(DEBIAN_MIRROR) && \
	  tar -C build/image-base -c . | $(PODMAN) import - $(IMAGE_BASE) && rm -rf build/image-base; }
	$(PODMAN) build $(PODMAN_FLAGS) $(BUILD_FLAGS) --build-arg BASE_IMAGE=$(IMAGE_BASE) -t $(IMAGE) .
	$(PODMAN) run --rm --network none $(PODMAN_FLAGS) $(IMAGE) demo --tasks 2

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
