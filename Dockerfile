# One image for every Tandem service (`tandem serve <name>`) and `tandem up`, with the bundled model inside.
#   docker build -t tandem:latest .        (CPU build of torch; for GPUs pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128)
#   docker compose up --build              (the local cluster of docker-compose.yml)
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/tandem

# torch first, pinned, from the chosen index, so that no other package pulls a different build
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md ./
COPY protos ./protos
COPY libs ./libs
COPY services ./services
RUN pip install -e . && python -m tandem.rpc.codegen

COPY models ./models

# gRPC ports of the default topology: controller 50050, gateway 50051, pools from 50060; metrics from 9400
EXPOSE 50050 50051 9400
USER nobody
ENTRYPOINT ["tandem"]
CMD ["--help"]
