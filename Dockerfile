# syntax=docker/dockerfile:1
# One image for every drip process in docker-compose.yml (migrate, worker, beat, serve, Flower):
# drip installed from pyproject.toml with `pip install .`, as the README installs it, and nothing
# else (no compilers, no test tools). Run alone, it is the web server: `drip serve`.
#
# The base is pinned by version and digest, so a rebuild gets the same operating system and Python;
# move both together when upgrading.
FROM python:3.12.11-slim-bookworm@sha256:519591d6871b7bc437060736b9f7456b8731f1499a57e22e6c285135ae657bf7

# No .pyc files written at run time (the code is read-only to the drip user anyway), logs
# unbuffered so `docker compose logs` shows each line as it is written, no pip cache in a layer.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 drip \
    && useradd --system --uid 10001 --gid drip --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin drip

# What the wheel is built from (.dockerignore lets in only these); the source tree is removed
# once drip is installed: the wheel carries its migrations and the shipped campaign.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY drip ./drip
COPY migrations ./migrations
COPY templates ./templates
RUN pip install --no-cache-dir . \
    && rm -rf /build

# The working directory of every drip process: worker.py (for `celery -A worker …`, which
# imports it from here), owned by root so the drip user cannot change it, and var/, drip's own
# folder (owner only), the one place the drip user may write.
WORKDIR /app
COPY worker.py ./
RUN install --directory --owner=drip --group=drip --mode=0700 /app/var

# Numeric, so that a runtime that checks for a non-root user (runAsNonRoot) can tell without
# reading /etc/passwd.
USER 10001:10001

# 8025: drip serve (unsubscribe links, /healthz); 5555: Flower.
EXPOSE 8025 5555

# The web server's health, for the image run alone. docker-compose.yml gives every other
# process its own check (or none), so none inherits this one.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8025/healthz', timeout=4)"]

CMD ["drip", "serve", "--host", "0.0.0.0", "--port", "8025"]
