# qbsync container image: one image, both roles (`docker run IMAGE source ...` / `destination ...`).
#
# The base image is a build argument. The default is the official Python image; any Debian-like
# image with Python 3.11+ (or where apt-get can install it) works, e.g. a local Debian base made
# with debootstrap, as `make image-test` does where no image registry is reachable:
#
#   docker build --build-arg BASE=qbsync-base:bookworm -t qbsync:latest .
#
# Stage 1 installs qbsync and its dependencies into a virtual environment (/opt/qbsync); stage 2
# copies only that environment (no compiler, no pip cache) and runs as an unprivileged user.
# Wheels placed in ./wheels of the build context are used offline (`make image-test` does
# this); without them pip downloads from the package index.
# Plain Dockerfile syntax (no BuildKit-only features), so the classic builder works too.

ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN python3 -c 'import venv, ensurepip' 2>/dev/null || { \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; }
WORKDIR /src
# "wheels*" may match nothing: then only pyproject.toml and README.md are copied here.
COPY pyproject.toml README.md wheels* ./
COPY src ./src
RUN python3 -m venv /opt/qbsync \
 && if ls ./*.whl >/dev/null 2>&1; then \
      /opt/qbsync/bin/pip install --no-index --find-links=. qbsync; \
    else \
      /opt/qbsync/bin/pip install .; \
    fi \
 && /opt/qbsync/bin/qbsync --version

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
RUN command -v python3 >/dev/null || { \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; } \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/qbsync --create-home \
        --shell /usr/sbin/nologin qbsync
COPY --from=build /opt/qbsync /opt/qbsync
ENV PATH=/opt/qbsync/bin:$PATH
# The source keeps its own small state under $HOME/.local/state/qbsync (or --state-dir);
# mount a volume at /var/lib/qbsync to keep it across container restarts.
ENV HOME=/var/lib/qbsync
WORKDIR /var/lib/qbsync
USER qbsync:qbsync
# 8080: health/metrics (--health-addr). 50051: destination listener (--listen).
EXPOSE 8080 50051
# Probes /healthz on the conventional port variables (HTTP_PORT wins over HEALTH_PORT, as in
# qbsync itself). If you move the endpoint with --health-addr, set HEALTH_PORT to match.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${HTTP_PORT:-${HEALTH_PORT:-8080}}/healthz', timeout=4)" || exit 1
ENTRYPOINT ["qbsync"]
CMD ["--help"]
