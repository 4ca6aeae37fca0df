# mlxmux gateway image. The same image runs the simulated nodes (`mlxmux sim-node`).
#   docker build -t mlxmux .
#   docker run --rm -p 8420:8420 -e MLXMUX_NODES=mac1=http://mac1.local:8080 mlxmux

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY state ./state
RUN python -m venv /opt/mlxmux && /opt/mlxmux/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/mlxmux /opt/mlxmux
ENV PATH=/opt/mlxmux/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin mlxmux
USER mlxmux
EXPOSE 8420
# Liveness (GET /health). The slim image has no curl, so python asks. MLXMUX_PORT moves the port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MLXMUX_PORT', '8420'), timeout=3)"]
ENTRYPOINT ["mlxmux"]
CMD ["serve", "--host", "0.0.0.0"]
