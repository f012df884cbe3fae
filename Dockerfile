# beamlens container image: the daemon with its shipped models, run as `beamlens run`.
#
#   docker build -t beamlens .
#   docker run --rm -p 127.0.0.1:8765:8765 \
#       -v "$PWD/configs/beamline.yaml:/etc/beamlens/config.yaml:ro" \
#       -v beamlens-runs:/var/lib/beamlens beamlens
#
# Build stage: a virtual environment from the hash-pinned lock (requirements.lock, made with
# `pip-compile --generate-hashes pyproject.toml`), then beamlens itself without dependencies.
# Runtime stage: the same slim base, the environment copied in, a numeric non-root user.
# BASE: the official slim image by default; `make image` builds from a Debian bookworm base made
# locally with mmdebstrap (python3, python3-venv, python-is-python3) where no registry is reachable.
ARG BASE=python:3.11.14-slim-bookworm
FROM ${BASE} AS build
# PIP_CERT: a CA bundle for networks whose TLS is intercepted by a proxy (`make image` mounts the
# host's bundle for the build only); unset by default. Nothing of it reaches the runtime stage.
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# C and C++ compilers for the dependencies PyPI has no wheel of (dectris-compression 0.4.0 is an sdist),
# and Python's headers where the base lacks them (a plain Debian base; the official image has them).
# Build stage only; unpinned: Debian bookworm's security updates move these versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && { python -c "import sysconfig, pathlib, sys; sys.exit(not (pathlib.Path(sysconfig.get_paths()['include']) / 'Python.h').exists())" \
         || apt-get install -y --no-install-recommends python3-dev; } \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/beamlens
WORKDIR /src
COPY requirements.lock ./
RUN /opt/beamlens/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY daemon ./daemon
COPY consumers ./consumers
COPY models ./models
COPY configs/beamline.yaml configs/demo.yaml ./configs/
# check-config imports every configured consumer: a broken install fails the build, not the night.
RUN /opt/beamlens/bin/pip install --no-cache-dir --no-deps . \
    && /opt/beamlens/bin/beamlens check-config configs/beamline.yaml

FROM ${BASE} AS runtime
LABEL org.opencontainers.image.title="beamlens" \
      org.opencontainers.image.description="Live analysis of Bluesky documents and detector frames: live maps, Prometheus metrics, derived documents, run files" \
      org.opencontainers.image.licenses="BSD-3-Clause"
RUN groupadd --system --gid 10001 beamlens \
    && useradd --system --uid 10001 --gid beamlens --home-dir /var/lib/beamlens --create-home beamlens
COPY --from=build /opt/beamlens /opt/beamlens
COPY configs/beamline.yaml /etc/beamlens/config.yaml
ENV PATH=/opt/beamlens/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BEAMLENS_HTTP__HOST=0.0.0.0 \
    BEAMLENS_HTTP__PORT=8765 \
    BEAMLENS_OUTPUTS__FILES__DIRECTORY=/var/lib/beamlens/runs
USER 10001:10001
WORKDIR /var/lib/beamlens
VOLUME ["/var/lib/beamlens"]
EXPOSE 8765
# /health answers 503 until every source is connected, so the container turns unhealthy when the
# proxy is unreachable, not only when the process hangs.
# (If you change BEAMLENS_HTTP__PORT, change the port here too.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/health', timeout=4)"]
ENTRYPOINT ["beamlens", "run"]
CMD ["--config", "/etc/beamlens/config.yaml"]
