# syntax=docker/dockerfile:1
#
# One image for every dykaf-lab process: the API, the migration step and the Celery workers
# (the command picks the role; see docker-compose.yml and docs/cluster.md).
#
# GPU image (default base: the official PyTorch CUDA runtime image, Python 3.11, torch preinstalled):
#     docker build -t dykaf-lab:latest .
# Another CUDA/torch combination: any pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime tag whose
# Python is 3.11+ and whose torch satisfies pyproject's pin (>=2.4,<2.14), e.g.
#     docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime .
# CPU-only image (no CUDA libraries, ~1 GB instead of ~7 GB; torch comes from TORCH_INDEX_URL,
# the CPU wheel index by default):
#     docker build -t dykaf-lab:cpu --build-arg BASE_IMAGE=python:3.11-slim .
#
# Every machine of a cluster must run the same image tag: the built-in corpora come from the
# image's Python (pydoc topics, standard library source), so a run that resumes on another machine
# only sees the same data stream when the image is the same.

ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

# Where torch comes from when the base image has none (the python:3.11-slim fallback). The CPU
# index keeps a CPU image small; use https://download.pytorch.org/whl/cu124 (etc.) for a CUDA
# build on a plain base such as nvidia/cuda:*-runtime with Python 3.11 added.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The unprivileged user the processes run as. Match it to the owner of a bind-mounted shared
# directory (NFS export) with --build-arg UID=$(id -u) --build-arg GID=$(id -g) if needed.
ARG UID=10001
ARG GID=10001

# PYTHONPATH=/app: the Alembic scripts (migrations/) and the dashboard (web/) are located next to
# the server and worker packages, and pyproject packages only dykaf*, worker* and server*; running
# the packages from the source tree in /app keeps all three together. The pip install below still
# provides the dependencies and the `dykaf-lab` command.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    DYKAF_DATA_DIR=/data \
    DYKAF_CACHE_DIR=/cache/dykaf-lab \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /app

RUN python -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else f"base image has Python {v.major}.{v.minor}; dykaf-lab needs 3.11+")'

# torch: kept from the base image when it has one (it satisfies the pin, so pip leaves it alone);
# otherwise installed first from TORCH_INDEX_URL so that pip never resolves a multi-GB CUDA wheel
# by accident on the CPU fallback.
RUN if python -c "import torch" 2>/dev/null; then \
        python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<2.14"; \
    fi

RUN groupadd --gid "${GID}" lab \
 && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/sh lab \
 && mkdir -p /data/checkpoints /cache /corpora \
 && chown -R lab:lab /data /cache /corpora

# Dependencies in their own layer (re-used while only the code changes): install the project's
# [lab] extra from pyproject.toml with empty packages, then drop the placeholder.
COPY pyproject.toml README.md ./
RUN mkdir -p dykaf worker server \
 && touch dykaf/__init__.py worker/__init__.py server/__init__.py \
 && pip install ".[lab]" \
 && pip uninstall -y dykaf-lab \
 && rm -rf dykaf worker server build ./*.egg-info

COPY dykaf ./dykaf
COPY server ./server
COPY worker ./worker
COPY migrations ./migrations
COPY web ./web
COPY examples ./examples
COPY bench ./bench
COPY docker ./docker
RUN pip install --no-deps ".[lab]" \
 && rm -rf build ./*.egg-info \
 && chmod 0755 /app/docker/entrypoint.sh /app/docker/healthcheck.py \
 && dykaf-lab --help >/dev/null

USER lab
EXPOSE 8000

# Liveness of the API (GET /healthz on the container port 8000). Worker and migration containers
# come from the same image but serve no HTTP; docker-compose.yml disables the check for them.
HEALTHCHECK --interval=30s --timeout=5s --start-period=40s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["dykaf-lab", "api", "--host", "0.0.0.0", "--port", "8000"]
