# The Dagster user-code image: the `recsys` code location (recsys_assets.definitions) served by
# `dagster api grpc`, also the image of the run pods and, as the CUDA variant, of the training pods.
# Built from the repository root:
#   docker build -f deploy/docker/Dagster.Dockerfile -t registry.example.com/recsys/recsys-dagster:0.1.0 .
#   docker build -f deploy/docker/Dagster.Dockerfile --build-arg VARIANT=cuda \
#     -t registry.example.com/recsys/recsys-dagster:0.1.0-cuda .
# Both install exactly the tested versions: requirements.lock (CPU; torch's CPU build, which the
# lock's torch==2.13.0 accepts as 2.13.0+cpu) or requirements-gpu.lock (the same pins, with
# onnxruntime-gpu in place of onnxruntime, PyPI's CUDA build of torch and TensorRT 10).
ARG VARIANT=cpu
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /opt/recsys
COPY requirements.lock requirements-gpu.lock ./

FROM base AS deps-cpu
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install -r requirements.lock

FROM base AS deps-cuda
RUN pip install -r requirements-gpu.lock

# The variant's stage of this file (deps-cpu or deps-cuda), not an image from a registry:
# checkov:skip=CKV_DOCKER_7: a build stage, not a registry image, so it has no tag
# hadolint ignore=DL3006
FROM deps-${VARIANT} AS final
COPY pyproject.toml README.md workspace.yaml ./
COPY recsys_assets ./recsys_assets
COPY recsys_serving ./recsys_serving
COPY feature_repo ./feature_repo
# --no-deps: the lock is the whole environment (pyproject's ranges would let pip add onnxruntime
# beside onnxruntime-gpu in the CUDA variant).
RUN pip install --no-deps . \
    && pip check \
    && groupadd --gid 10001 recsys \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin recsys \
    && mkdir -p /opt/dagster/dagster_home
# The root filesystem is read-only in the pods: caches and HOME go to the /tmp emptyDir.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    RECSYS_HOME=/var/lib/recsys
USER 10001:10001
EXPOSE 3030
HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD ["dagster", "api", "grpc-health-check", "-p", "3030"]
CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", "--module-name", "recsys_assets.definitions"]
