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
# The dependencies first, in their own layer: read from pyproject.toml alone, so a change to
# herald's code reuses this layer and reinstalls only herald. The [project] dependencies
# only: no [embedded] extra (no broker or database server wheels) and no [dev].
COPY pyproject.toml ./
RUN pip install --upgrade pip \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Then herald itself. Not editable: a regular install, so the packages (herald, config,
# core, consumers, api, producers, channels, storage) and their data (migrations, rules,
# the notification center's static files) live in site-packages and the tree is dropped.
COPY . .
RUN pip install --no-deps .


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
