# syntax=docker/dockerfile:1
# tandem: one image for every service (`tandem gateway|router|prefill|decode`).
#
#   docker build -t tandem:latest .
#   docker run --rm --gpus all -v /path/to/hf-model:/model:ro tandem:latest decode --model /model ...
#
# Stage `build` installs tandem and its Python dependencies into a virtual environment that
# sees the base image's torch (--system-site-packages); `pip install .` runs setup.py's build_py,
# which generates the gRPC code from protos/*.proto with grpcio-tools inside pip's isolated
# build environment. Stage `runtime` starts again from the same base and copies only that
# environment: no source tree, no pip cache, no grpcio-tools or setuptools build environment.

# A CUDA PyTorch runtime image; torch inside it must satisfy pyproject's range (>=2.4,<3).
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv --system-site-packages /opt/tandem
# TORCH_PIP_ARGS: where torch comes from when the base image has none (a slim Python or bare
# Debian base): pip's arguments for it, e.g. "--index-url https://download.pytorch.org/whl/cpu"
# for the CPU-only build (PyPI's Linux torch pulls GBs of CUDA libraries), or "--no-index
# --find-links /wheels" for a wheel directory mounted into the build (podman build -v).
# Empty (the default): the base image's torch. Installed before the source is copied, so a
# source change keeps this layer; the range is pyproject's.
ARG TORCH_PIP_ARGS=
ARG TORCH_REQUIREMENT="torch>=2.4,<3"
RUN if [ -n "$TORCH_PIP_ARGS" ]; then \
      /opt/tandem/bin/pip install --no-deps $TORCH_PIP_ARGS "$TORCH_REQUIREMENT"; \
    fi
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tandem_cli/ tandem_cli/
COPY bench/ bench/
COPY gateway/ gateway/
COPY router/ router/
COPY prefill_service/ prefill_service/
COPY decode_service/ decode_service/
COPY worker/ worker/
COPY kvtransfer/ kvtransfer/
COPY tandem/ tandem/
COPY kernels/ kernels/
COPY protos/ protos/
COPY rpc/ rpc/
RUN /opt/tandem/bin/pip install . \
 && /opt/tandem/bin/python -c "import torch, protos.worker_pb2, tandem_kernels.registry, tandem_cli.main; print('torch', torch.__version__)"

FROM ${BASE_IMAGE} AS runtime
# Triton compiles a small C launcher the first time a kernel runs, so the runtime needs a C
# compiler even though nothing is built here; older pytorch/pytorch runtime images lack one.
# Only gcc and libc headers, and only when the base has no cc: no g++, make or build-essential.
RUN if ! command -v cc >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid tandem --create-home --home-dir /home/tandem tandem \
 && mkdir -p /home/tandem/.cache /model /certs \
 && chown -R tandem:tandem /home/tandem \
 && chown tandem:tandem /certs \
 && chmod 0750 /certs
COPY --from=build /opt/tandem /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH \
    HOME=/home/tandem \
    HF_HOME=/home/tandem/.cache/huggingface \
    TANDEM_CACHE=/home/tandem/.cache/tandem \
    TRITON_CACHE_DIR=/home/tandem/.cache/triton \
    PYTHONUNBUFFERED=1
USER tandem:tandem
WORKDIR /home/tandem
# /certs: where compose's `certs` service writes the internal plane's certificates. An empty
# named volume mounted there takes this directory's owner, so `tandem certs` (uid 10001) can
# write into it and only uid 10001 can read the keys. Not a VOLUME: only compose mounts one.
# models (read-only mounts) and caches (converted GGUFs, HF files, compiled Triton kernels)
VOLUME ["/model", "/home/tandem/.cache"]
# gateway HTTP, router gRPC, prefill gRPC, decode gRPC, Prometheus (router, workers)
EXPOSE 8000 50051 50100 50200 9090 9100
ENTRYPOINT ["tandem"]
CMD ["--help"]
