# actex worker image: `docker build --build-arg ACCELERATOR=tpu -t actex:tpu .`
# The entrypoint is `actex`: `docker run --network none actex:cpu demo` works offline.
# Versions: Python's from PYTHON_VERSION (within pyproject's requires-python), every
# package's from constraints.txt, the one place the image's pins live (checked against
# pyproject.toml by tests/test_dockerfile.py); each is installed from the lock `make lock`
# wrote for the ACCELERATOR and EXTRAS (requirements/<accelerator>-<extras>.lock) with
# --require-hashes: a package whose bytes are not the locked ones fails the build.
ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm
# Any Debian with python3 and python3-venv of that version; `make image-test` passes a
# base it made with debootstrap, as no image registry is reachable there.
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}

# ---- build: a virtualenv with actex and its extras, from wheels only
FROM ${BASE_IMAGE} AS build
# cpu | tpu (jax[tpu], libtpu) | cuda (jax[cuda12])
ARG ACCELERATOR=cpu
# Storage backends and engines; add ray for workers on a Ray cluster: EXTRAS=gcs,s3,ray
# (after `make lock LOCKS=cpu-gcs-s3-ray`: each combination installs from its own lock)
ARG EXTRAS=gcs,s3
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN case "${ACCELERATOR}" in cpu|tpu|cuda) ;; \
      *) echo "ACCELERATOR must be cpu, tpu or cuda, not '${ACCELERATOR}'" >&2; exit 2 ;; esac
RUN python3 -m venv /opt/actex
ENV PATH=/opt/actex/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY requirements ./requirements
COPY src ./src
# Third-party packages only from the lock, checked by hash; then actex itself from this
# source, offline and with the locked build backend (no unpinned build environment).
RUN name="${ACCELERATOR}-$(echo "${EXTRAS}" | tr , -)"; lock="requirements/${name}.lock"; \
    if [ ! -f "$lock" ]; then echo "no $lock: run make lock LOCKS=${name}" >&2; exit 2; fi; \
    pip install --require-hashes --only-binary=:all: --constraint constraints.txt -r requirements/build.lock -r "$lock" \
    && pip install --no-deps --no-index --no-build-isolation . \
    && pip check && actex --help > /dev/null

# ---- runtime: the virtualenv, a non-root user, nothing else
FROM ${BASE_IMAGE}
ARG ACCELERATOR=cpu
LABEL org.opencontainers.image.title="actex" \
      org.opencontainers.image.description="Exactly-once extraction of decoder-LLM activations" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.actex.accelerator="${ACCELERATOR}"
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin actex
COPY --from=build /opt/actex /opt/actex
ENV PATH=/opt/actex/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/actex
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/actex
ENTRYPOINT ["actex"]
CMD ["--help"]
