# SuperNode + ClientApp image for edge devices (x86_64 and arm64, e.g. Raspberry Pi 5, Jetson).
# The image holds code and dependencies only: no weights, no data. Mount the asset cache at
# /home/app/.cache/federa (run `federa fetch` once, on the device or copied over).
#
#   docker build -t federa-supernode .
#   docker build --build-arg BASE_IMAGE=<an arm64/Jetson base with Python 3.11> -t federa-supernode .
ARG BASE_IMAGE=flwr/supernode:1.42.0
FROM ${BASE_IMAGE}

WORKDIR /app
# torch first, pinned: an unpinned torch drags in several GB of CUDA wheels on x86_64.
ARG TORCH_SPEC=torch==2.13.0
RUN python -m pip install --no-cache-dir "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY federa_app ./federa_app
RUN python -m pip install --no-cache-dir .

ENV FEDERA_HOME=/home/app/.cache/federa \
    HF_HUB_OFFLINE=1 \
    FLWR_TELEMETRY_ENABLED=0
VOLUME ["/home/app/.cache/federa"]
# The base image runs as the non-root user `app` and its entrypoint is flower-supernode.
