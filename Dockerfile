# One image for every psky service; the command picks the service:
#   docker run psky ingester | backfiller | indexer | migrate | status | dlq list
# Build from the repository root:  docker build -t psky:latest .
# Dependencies are pinned by requirements.lock (only the runtime ones are installed).

FROM python:3.12-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/psky
ENV PATH=/opt/psky/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Dependencies first: this layer is reused until the lock file or pyproject changes.
COPY requirements.lock pyproject.toml README.md ./
RUN mkdir psky && touch psky/__init__.py \
 && pip install --constraint requirements.lock . \
 && pip uninstall -y psky
# setup.py builds the C extension (psky.atproto._native: the firehose commit fast path, the
# MST inverter, K-256 checks) with the compiler above; without it psky would run several times slower
COPY setup.py ./
COPY psky ./psky
RUN pip install --no-deps . \
 && cd / && python -c "from psky.atproto import crypto, firehose, mst; assert mst.NATIVE_INVERSION and firehose.NATIVE_COMMITS and crypto.NATIVE_K256, 'C extension not built'"

FROM python:3.12-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/psky --create-home psky
COPY --from=build /opt/psky /opt/psky
ENV PATH=/opt/psky/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    PSKY_DATA_DIR=/var/lib/psky/data
USER psky
WORKDIR /var/lib/psky
# Every service serves /metrics and /health on its metrics port (9090 by default).
EXPOSE 9090
# SIGTERM (docker stop) drains the service: in-flight work is acknowledged or left pending.
STOPSIGNAL SIGTERM
ENTRYPOINT ["psky"]
CMD ["--help"]
