# syntax=docker/dockerfile:1
# One image for every pod of a Subsume run on Kubernetes: Ray head and workers, the RayJob submitter
# and the scheduled-run creator (hence kubectl). See docs/kubernetes.md.
#
#   docker build -t REGISTRY/subsume:0.1.0-gpu .                      # CUDA base, CUDA torch (default)
#   docker build --build-arg VARIANT=cpu -t REGISTRY/subsume:0.1.0-cpu .   # plain base, CPU torch
#
# Installs like the Makefile: torch first (the CPU or CUDA build chosen here, so resolving the project
# never swaps it), then the project against configs/constraints.txt; here non-editable and without the
# dev extra. Runs as a non-root user; a read-only root filesystem works when /tmp and /cache are
# volumes (Ray's temp dir is /tmp/ray, the Hugging Face cache is HF_HOME=/cache/huggingface).

ARG VARIANT=gpu
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_BASE=ubuntu:24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG KUBECTL_IMAGE=registry.k8s.io/kubectl:v1.35.3

FROM ${UV_IMAGE} AS uv
FROM ${KUBECTL_IMAGE} AS kubectl

# The torch wheel index per variant: the default index's Linux torch is the CUDA build (its CUDA
# libraries come as wheels; the base image brings the driver hooks); the CPU build has its own index.
FROM ${CUDA_BASE} AS base-gpu
ENV TORCH_INDEX_URL=
FROM ${CPU_BASE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM base-${VARIANT}
ARG PYTHON_VERSION=3.11
ARG TORCH=torch==2.13.0

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates wget \
 && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv
COPY --from=kubectl /bin/kubectl /usr/local/bin/kubectl

# The Python the constraints were resolved for, the same on both bases (uv fetches a standalone build).
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN uv venv --seed --python "${PYTHON_VERSION}" /opt/venv

# As in the Makefile: torch first and alone, so that the project never resolves another build of it.
RUN python -m pip install "${TORCH}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}

WORKDIR /opt/subsume
COPY . .
# ray[default] adds the dashboard and job server that KubeRay submits jobs through; ray itself stays
# pinned by the constraints.
RUN python -m pip install -c configs/constraints.txt . "ray[default]" \
 && python -c "import subsume.cli, torch, ray; print('torch', torch.__version__, 'ray', ray.__version__)"

# A fixed numeric UID/GID, so that Kubernetes can check runAsNonRoot (k8s/ runs pods as 10001 too).
RUN groupadd --gid 10001 subsume \
 && useradd --uid 10001 --gid 10001 --home-dir /home/subsume --create-home --shell /bin/bash subsume \
 && mkdir -p /cache/huggingface \
 && chown -R 10001:10001 /cache

ENV HOME=/home/subsume \
    HF_HOME=/cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
VOLUME ["/cache"]
CMD ["subsume", "--help"]
