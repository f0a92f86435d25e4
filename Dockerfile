# syntax=docker/dockerfile:1
# lockbroker broker image: the server against an external etcd (LOCKBROKER_ETCD_ENDPOINTS).
#   docker build -t lockbroker .
#   docker run --rm -e LOCKBROKER_ETCD_ENDPOINTS=http://etcd:2379 -p 50051:50051 lockbroker \
#       serve --auth-tenants-file /etc/lockbroker/tenants.toml \
#       --tls-cert-file /etc/lockbroker/tls.pem --tls-key-file /etc/lockbroker/tls-key.pem
# (the image listens on 0.0.0.0: without a tenants file and TLS it refuses to start unless
# given --insecure-remote, as deploy/compose/ does on its private network).
# The image has no etcd binary: the embedded etcd is for a developer's machine, not a container.
# Checked here by tests/test_packaging.py (hadolint); the build itself is verified by hand with
# the command above (docs/operating.md).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "uv==0.13.10"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY client client
COPY interceptors interceptors
# A wheel, then a venv holding it and its runtime dependencies only (no dev tools, no Node).
RUN uv build --wheel --out-dir /dist . \
    && python -m venv /opt/lockbroker \
    && /opt/lockbroker/bin/pip install --no-cache-dir /dist/*.whl

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 lockbroker \
    && useradd --system --uid 10001 --gid lockbroker --home-dir /var/lib/lockbroker --create-home \
        --shell /usr/sbin/nologin lockbroker
COPY --from=build /opt/lockbroker /opt/lockbroker
COPY deploy/docker/healthcheck.py /opt/lockbroker/healthcheck.py
ENV PATH=/opt/lockbroker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOCKBROKER_LISTEN=0.0.0.0:50051 \
    LOCKBROKER_METRICS_LISTEN=0.0.0.0:9464
USER 10001:10001
WORKDIR /var/lib/lockbroker
EXPOSE 50051 9464
# gRPC health (grpc.health.v1) of the broker's own service, over loopback, with the image's Python.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/opt/lockbroker/bin/python", "/opt/lockbroker/healthcheck.py"]
ENTRYPOINT ["lockbroker"]
CMD ["serve"]
