# pool-exporter: the sidecar (`serve`, the default) and the demo (`demo`) in one small image.
# Build: docker build -t sqlalchemy-pool-exporter .
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check ".[sidecar,demo]"

FROM python:3.12-slim
LABEL org.opencontainers.image.title="sqlalchemy-pool-exporter" \
      org.opencontainers.image.description="Prometheus metrics for SQLAlchemy connection pools" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed non-root user; the multiprocess directory exists in the image so a fresh named volume
# mounted there inherits its owner and the workers can write it.
RUN groupadd --system --gid 10001 exporter \
 && useradd --system --uid 10001 --gid exporter --no-create-home --shell /usr/sbin/nologin exporter \
 && mkdir -p /var/lib/pool-exporter/multiproc \
 && chown -R exporter:exporter /var/lib/pool-exporter
COPY --from=build /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    POOL_EXPORTER_HOST=0.0.0.0 \
    POOL_EXPORTER_PORT=9717
USER 10001:10001
WORKDIR /var/lib/pool-exporter
EXPOSE 9717
# /healthz answers without credentials; no curl in the slim image, so ask Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('POOL_EXPORTER_PORT', '9717'), timeout=4)"]
ENTRYPOINT ["pool-exporter"]
CMD ["serve"]
