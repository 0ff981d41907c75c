# The vectorstream image: `vectorstream worker` with the packaged all-MiniLM-L6-v2 model; nothing is downloaded at
# run time. Configuration is by VECTORSTREAM_* environment variables only (README: the settings table).
#
#   docker build -t vectorstream .
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<a CPU-only PyTorch index> -t vectorstream .   # smaller image
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
# PyPI's torch wheel carries the CUDA libraries (a few GB); an index of CPU-only wheels leaves them out
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/vectorstream
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY pipeline ./pipeline
COPY agents ./agents
RUN /opt/vectorstream/bin/pip install .

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/vectorstream /opt/vectorstream
RUN useradd --system --uid 10001 --home-dir /data --create-home vectorstream
ENV PATH=/opt/vectorstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    APP_DATADIR=/data/faust \
    VECTORSTREAM_DATA_DIR=/data \
    VECTORSTREAM_STORE__PATH=/data/qdrant-edge \
    VECTORSTREAM_METRICS__PORT=9464
USER vectorstream
WORKDIR /data
VOLUME ["/data"]
# /metrics, /healthz and /readyz
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VECTORSTREAM_METRICS__PORT', '9464'), timeout=4)"
ENTRYPOINT ["vectorstream"]
CMD ["worker"]
