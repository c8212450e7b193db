# The FeDeRA image: Flower 1.42's SuperExec plus this project and its runtime dependencies.
#
# With `--isolation process` (compose.yaml) the SuperLink and the SuperNodes run Flower's own
# images and start no app code; each SuperExec runs the app processes itself: `flwr-serverapp`
# next to the SuperLink, `flwr-clientapp` next to each SuperNode. So this one image (torch,
# transformers, peft, federa_app) serves every SuperExec, the ServerApp's included. Built on
# flwr/supernode instead (BASE_IMAGE=flwr/supernode:1.42.0-py3.11-ubuntu24.04) it is a SuperNode
# that runs its ClientApps in subprocesses (`--isolation subprocess`, no separate SuperExec).
# The entrypoint is the base image's (flower-superexec or flower-supernode); compose.yaml names it.
#
# Code and dependencies only: no weights, no data, no certificates. The asset cache
# (FEDERA_HOME) is a volume: fill it once with `federa fetch` (docs/docker.md).
#
#   docker build -t federa-superexec .                                      # x86_64, CPU torch
#   docker buildx build --platform linux/arm64 -t federa-superexec --load .  # arm64 (Pi 5, ...)
#   docker build --build-arg BASE_IMAGE=<image with Python 3.11/3.12 and NVIDIA's torch> \
#       --build-arg TORCH_SPEC= -t federa-superexec .                       # Jetson: keep its torch

# Flower's unsuffixed tag is Python 3.13, outside this project's requires-python: name the Python.
ARG BASE_IMAGE=flwr/superexec:1.42.0-py3.11-ubuntu24.04
FROM ${BASE_IMAGE}

# torch before the project, pinned, from PyTorch's CPU index: PyPI's x86_64 torch wheels pull
# several GB of CUDA libraries. TORCH_SPEC= (empty) keeps a torch the base already has (Jetson);
# TORCH_INDEX_URL= (empty) installs from PyPI (or set a CUDA index, e.g. .../whl/cu128).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV HOME=/app \
    FEDERA_HOME=/app/.cache/federa \
    HF_HUB_OFFLINE=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PYTHONUNBUFFERED=1
# FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION is read by flower-superlink; SuperNodes and
# SuperExecs install nothing unless given --allow-runtime-dependency-installation (compose.yaml
# never does): a runtime `uv sync` of pyproject.toml would fetch PyPI's CUDA torch.

USER root
# Flower's images run as `app` (uid 49999, home /app); a base without that user gets it.
RUN id -u app >/dev/null 2>&1 \
    || useradd --uid 49999 --home-dir /app --create-home --shell /usr/sbin/nologin app

# Dependencies first, in a layer of their own: pyproject.toml with empty packages installs
# exactly its dependency set (flwr==1.42.0 is already in the base and stays), so a change to the
# code alone rebuilds in seconds instead of reinstalling torch and the rest.
# PIP_BREAK_SYSTEM_PACKAGES only matters on a base whose system Python is pip-protected.
COPY pyproject.toml README.md /opt/federa/
RUN set -eu; \
    export PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1; \
    if [ -n "${TORCH_SPEC}" ]; then \
        python3 -m pip install ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} "${TORCH_SPEC}"; \
    fi; \
    for pkg in federa_app federa_ops simulation; do \
        mkdir -p "/opt/federa/$pkg" && touch "/opt/federa/$pkg/__init__.py"; \
    done; \
    python3 -m pip install /opt/federa; \
    rm -rf /opt/federa/federa_app /opt/federa/federa_ops /opt/federa/simulation \
        /opt/federa/build /opt/federa/*.egg-info

# Then the project itself. federa_app is installed too: the app bundle (FAB) brings its own
# copy, which is first on sys.path at run time; federa_ops gives the `federa` command.
COPY federa_app /opt/federa/federa_app
COPY federa_ops /opt/federa/federa_ops
COPY simulation /opt/federa/simulation
RUN set -eu; \
    export PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1; \
    python3 -m pip install --no-deps /opt/federa; \
    rm -rf /opt/federa/build /opt/federa/*.egg-info; \
    flower-superexec --version; \
    for cmd in flwr-serverapp flwr-clientapp federa; do command -v "$cmd" >/dev/null; done

# The cache directory exists, owned by `app`, before VOLUME: a new named volume copies it.
RUN mkdir -p "${FEDERA_HOME}" && chown -R app:app /app
VOLUME ["/app/.cache/federa"]

WORKDIR /app
USER app
