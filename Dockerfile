# sida serving image: `sida serve` on the demo model, or on a model mounted under /models.
#
# GPU (default):  docker build -t sida .
#                 docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro sida --model /models/<folder>
# CPU:            docker build -t sida:cpu --build-arg BASE=ubuntu:24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# PyPI's Linux torch wheel is a CUDA build that brings its own CUDA libraries (cuBLAS, cuDNN, ...), so the base is
# NVIDIA's `base` flavour: the driver hooks and forward-compatibility libraries, without a second copy of the
# CUDA runtime libraries that the `runtime` flavour would add. Its CUDA major version matches the wheel's.
ARG BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The distribution's Python follows the base image; pinning its patch release would break every base update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: the largest download, and it changes less often than the code.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY predictor /src/predictor
COPY offload /src/offload
COPY demo_model /src/demo_model
RUN pip install /src

FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sida \
    && useradd --system --no-log-init --create-home --home-dir /home/sida --uid 10001 --gid sida sida \
    && mkdir /models
COPY --from=build /opt/venv /opt/venv
COPY configs /opt/sida/configs
COPY models/sida-switch-demo /opt/sida/models/sida-switch-demo
COPY models/sida-olmoe-demo /opt/sida/models/sida-olmoe-demo
# Settings come from SIDA_* variables and flags (flags win). A container must listen on every interface;
# models are read from local folders only, never fetched.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    SIDA_MODEL_DIR=/opt/sida/models/sida-switch-demo \
    SIDA_HOST=0.0.0.0 \
    SIDA_PORT=8000
# Numeric, so that a runtime enforcing non-root users (Kubernetes runAsNonRoot) can check it.
USER 10001:10001
WORKDIR /home/sida
EXPOSE 8000
# Liveness only: the model may take minutes to load, and /health/ready is for load balancers to gate traffic.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SIDA_PORT', '8000') + '/health/live', timeout=4)"]
ENTRYPOINT ["sida", "serve"]
CMD []
