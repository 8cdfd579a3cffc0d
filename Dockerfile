# syntax=docker/dockerfile:1
# qbsync container image: one image, both roles (`docker run IMAGE source ...` / `destination ...`).
#
# Stage 1 builds wheels for qbsync and all its dependencies; stage 2 installs only those wheels
# (no compiler, no build tools, no pip cache) and runs as an unprivileged user.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels qbsync \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/qbsync --create-home \
        --shell /usr/sbin/nologin qbsync
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
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${HTTP_PORT:-${HEALTH_PORT:-8080}}/healthz', timeout=4)" || exit 1
ENTRYPOINT ["qbsync"]
CMD ["--help"]
