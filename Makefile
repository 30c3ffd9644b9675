# Two entry points (see README): `make demo` and `make test`. Both go through `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel this kind of machine carries; plain `torch` pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench clean image-test lock

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
	$(BIN)/python -m pytest -q --durations=25 tests

bench: install
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/reader.py

# Hash-locked requirements: the image (Dockerfile) and the TPU VMs' bootstrap install with
# `pip install --require-hashes` from requirements/<accelerator>-<extras>.lock (every package
# with its sha256s), resolved within constraints.txt for the image's Python on Linux x86_64
# with glibc 2.35 (Ubuntu 22.04 TPU VMs; Debian bookworm has 2.36); build.lock holds the
# build backend the image builds actex with. Run after changing constraints.txt or
# pyproject.toml's dependencies (tests/test_dockerfile.py checks the locks agree). uv
# resolves for that platform, not this machine's: the locks do not depend on where they
# were made.
LOCK_PYTHON ?= 3.11
LOCK_PLATFORM ?= x86_64-manylinux_2_35
LOCKS ?= cpu-gcs-s3 tpu-gcs-s3 cuda-gcs-s3 tpu-gcs
LOCK_UV := build/lock-venv/bin/uv
UV_COMPILE = $(LOCK_UV) pip compile --quiet --generate-hashes --python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) --custom-compile-command "make lock"

$(LOCK_UV):
	$(PY) -m venv build/lock-venv
	build/lock-venv/bin/pip install -q "uv==0.13.8"

lock: $(LOCK_UV)
	for lock in $(LOCKS); do \
	  $(UV_COMPILE) pyproject.toml $$(echo "$$lock" | tr '-' '\n' | sed 's/^/--extra /') --constraint constraints.txt \
	    --output-file "requirements/$$lock.lock" || exit 1; \
	done
	$(UV_COMPILE) requirements/build.in --output-file requirements/build.lock

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
