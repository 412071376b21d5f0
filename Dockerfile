# fastfan's image: `docker build -t fastfan .`, then
#   docker run -p 8080:8080 -e FASTFAN_JWT_SECRET="$(openssl rand -base64 32)" fastfan
# or with a config file: -v ./fastfan.toml:/etc/fastfan/fastfan.toml:ro
#   -e FASTFAN_CONFIG=/etc/fastfan/fastfan.toml (deploy/ has systemd and Kubernetes examples).
# Both stages are Debian 12 (its python3, 3.11): what deploy/check-image.sh rebuilds in a
# debootstrap root where no image registry is reachable.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The compiler and the headers stay in this stage: the next one copies the environment only.
RUN deploy/install.sh /opt/fastfan

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fastfan
COPY --from=build /opt/fastfan /opt/fastfan
ENV PATH=/opt/fastfan/bin:$PATH \
    PYTHONUNBUFFERED=1
USER fastfan
EXPOSE 8080
# /health is 200 while a worker's loop runs (/ready is the readiness probe's, not this).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FASTFAN_PORT', '8080'), timeout=2)"]
# SIGTERM drains: /ready 503, then clients closed with 1001 over --shutdown-grace; give
# `docker stop -t` more than --drain-delay + --shutdown-grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastfan"]
CMD ["run", "--workers", "auto"]
