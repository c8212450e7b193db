# A local stand-in for Flower's own images (flwr/superlink, flwr/supernode, flwr/superexec
# 1.42.0-py3.11), for machines that reach PyPI and Debian's packages but no image registry.
# Laid out as Flower's images are (flwr's src/docker/base): Python in a virtualenv at
# /python/venv on PATH, owned by the non-root user `app` (uid 49999, home /app), flwr==1.42.0
# installed with pip, `app` as the user. The three Flower entry points are all present; compose
# names the one each service runs. BASE_IMAGE: a Debian rootfs with python3.11 and
# python3.11-venv, imported with `docker import` (deploy/docker_check.py builds it).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}

ARG FLWR_VERSION=1.42.0
ENV LANG=C.UTF-8 \
    PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN set -eu; \
    useradd --uid 49999 --user-group --home-dir /app --create-home --shell /usr/sbin/nologin app; \
    python3.11 -m venv /python/venv; \
    /python/venv/bin/python -m pip install "flwr==${FLWR_VERSION}"; \
    chown -R app:app /python; \
    for cmd in flower-superlink flower-supernode flower-superexec flwr-clientapp; do \
        command -v "$cmd" >/dev/null; \
    done

WORKDIR /app
USER app
ENTRYPOINT ["flower-superexec"]
