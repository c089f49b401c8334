# syntax=docker/dockerfile:1
#
# herald image: one image, many roles. The sub-command picks the role:
#   docker run herald migrate | ingest | ...
#
# Two stages: the builder installs the project (and its dependencies) into a
# virtualenv with `pip install .`; the runtime stage copies only that venv, so
# the source tree, tests and .git never reach the final image.
# confluent-kafka and psycopg[binary] ship manylinux wheels for CPython 3.11
# (amd64 and arm64), so no compiler or librdkafka/libpq headers are needed.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
COPY . .
# Not editable: a regular install (no [embedded] extra: no broker or database
# server wheels in the image), so the packages (herald, config, core, consumers,
# producers, storage) and any package data such as storage/migrations live in
# site-packages and the source tree can be dropped.
RUN pip install --upgrade pip \
 && pip install .


FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="Kafka events in, notifications out"

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Unprivileged user; herald needs no write access to the filesystem.
RUN groupadd --system --gid 10001 herald \
 && useradd --system --uid 10001 --gid herald --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin herald

COPY --from=build /opt/venv /opt/venv

USER herald
WORKDIR /tmp

# /metrics and /healthz of long-running roles (HERALD_METRICS_PORT).
EXPOSE 9400

ENTRYPOINT ["herald"]
CMD ["--help"]
