# syntax=docker/dockerfile:1
#
# infobip-relay container image.
#
#   docker build -t infobip-relay .
#   docker run -d --name relay -p 2525:2525 -p 9465:9465 \
#     -e INFOBIP_API_KEY=... -v relay-spool:/var/spool/infobip-relay \
#     --stop-timeout 45 infobip-relay
#
# Zero-config: everything comes from the environment (INFOBIP_API_KEY is required; see ENV below
# for the rest). With a config file instead, mount it and pass it to serve:
#   docker run ... -v ./config.yaml:/etc/infobip-relay/config.yaml:ro \
#     -v ./api-key:/run/secrets/infobip_api_key:ro \
#     infobip-relay serve -c /etc/infobip-relay/config.yaml
# and have the config say `password_file: /run/secrets/infobip_api_key`.
#
# Stopping: SIGTERM starts a graceful drain of up to 30 s; Docker's default stop timeout is 10 s,
# hence --stop-timeout 45 above (stop_grace_period in Compose, terminationGracePeriodSeconds in
# Kubernetes). Mail acknowledged with 250 is on the spool volume either way.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: resolve dependencies and install the project into a self-contained venv --------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The venv lives at the same path in both stages: its scripts' shebangs name that path.
RUN python -m venv /opt/infobip-relay

WORKDIR /src
# Only what the build needs (.dockerignore allow-lists these too), so editing tests or docs does
# not invalidate the cached install layer.
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN /opt/infobip-relay/bin/pip install --no-cache-dir /src

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# A fixed, high uid/gid that exists in no host passwd file: files the relay writes to a bind
# mount are attributable, and Kubernetes' runAsNonRoot can check the numeric USER below.
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin relay \
    && install -d -o relay -g relay -m 0700 /var/spool/infobip-relay \
    && install -d -m 0755 /etc/infobip-relay

COPY --from=builder /opt/infobip-relay /opt/infobip-relay

# RELAY_LISTEN / RELAY_METRICS_LISTEN: the relay defaults to loopback, which nothing outside the
# container can reach, so the image listens on all interfaces.
# RELAY_TRUSTED_NETWORKS: who may relay without AUTH. The default is the private ranges a
# sidecar or an in-cluster gateway sees its clients from: loopback (Kubernetes sidecar), RFC 1918
# (Docker bridge networks are carved from 172.16/12 and 192.168/16, pod networks are usually in
# 10/8) and IPv6 ULA. Narrow it to your actual subnet, and never publish port 2525 beyond a
# private network with this default: behind Docker's userland proxy or rootless port forwarding
# every client appears to come from a private address. Use AUTH on such a listener instead.
ENV PATH=/opt/infobip-relay/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_LISTEN=0.0.0.0:2525 \
    RELAY_METRICS_LISTEN=0.0.0.0:9465 \
    RELAY_QUEUE_PATH=/var/spool/infobip-relay \
    RELAY_TRUSTED_NETWORKS=127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7

# The spool must outlive the container: accepted mail waits here until Infobip takes it.
VOLUME /var/spool/infobip-relay
WORKDIR /var/spool/infobip-relay
EXPOSE 2525 9465

USER 10001:10001

# slim has no curl; the interpreter is there anyway. The port follows RELAY_METRICS_LISTEN, and a
# wildcard bind is probed through loopback. Any failure (refused, timeout, non-2xx) exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; h, _, p = os.environ.get('RELAY_METRICS_LISTEN', '127.0.0.1:9465').rpartition(':'); h = h.strip('[]'); h = '127.0.0.1' if h in ('', '0.0.0.0', '::') else h; h = f'[{h}]' if ':' in h else h; u.urlopen(f'http://{h}:{p}/healthz', timeout=4)"]

ENTRYPOINT ["infobip-relay"]
CMD ["serve"]
