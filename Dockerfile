# One image for all three services (memory, compute, gateway): they share the code, the
# tokenizer ranks and the model files; compose picks the command.
# Two stages from the same base: `build` has g++/make, installs torch and the pinned dependencies
# into the virtualenv /opt/venv, compiles the C++ kernels and generates the gRPC stubs; the runtime
# stage copies the virtualenv, the app and the kernel library, and has no compiler and no make. It
# runs as uid 10001 and writes only under /tmp, so it runs with a read-only root filesystem.
#
# The default base is pinned by digest (python:3.11-slim, Debian bookworm). The digest was taken
# from public Dockerfiles and could NOT be verified where this file was written (no registry is
# reachable there): check it (`docker buildx imagetools inspect python:3.11-slim`) before relying
# on it. Override with --build-arg BASE_IMAGE=...; both stages use it (the compose test passes a
# local debootstrapped bookworm image).
ARG BASE_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${BASE_IMAGE} AS build

RUN apt-get update && apt-get install -y --no-install-recommends g++ make \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
# The base's own pip installs into the virtualenv (--python): no ensurepip needed (Debian's python3 lacks it).
RUN python -m venv --without-pip /opt/venv
WORKDIR /app

# CPU torch 2.13.0 (never the multi-GB CUDA build): a wheel in ./wheels wins, else PyTorch's CPU index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY wheels/ /wheels/
RUN python -m pip --python /opt/venv/bin/python install --find-links /wheels \
      ${TORCH_INDEX_URL:+--extra-index-url ${TORCH_INDEX_URL}} torch==2.13.0

# The pinned dependencies, in their own layer: it changes only when pyproject.toml does.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
    && python -m pip --python /opt/venv/bin/python install --find-links /wheels -r /tmp/requirements.txt

ENV PATH=/opt/venv/bin:$PATH

# The C++ kernels in a layer keyed on their sources alone: a change elsewhere in the tree does not
# recompile them. The library is copied to /opt/kernels, which the runtime stage imports directly.
COPY compute_service/__init__.py compute_service/native.py compute_service/
COPY compute_service/csrc/ compute_service/csrc/
RUN python -m compute_service.native --build --require --install-to /opt/kernels

COPY . .
# The stubs, the bytecode (the runtime cannot write it), and no wheel files in /app.
RUN protos/generate.sh \
    && rm -rf wheels/*.whl \
    && python -m compileall -q --invalidation-mode checked-hash /app \
    && chmod -R a+rX /app /opt/venv /opt/kernels

FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH \
    HOME=/tmp XDG_CACHE_HOME=/tmp/.cache \
    PAGED_NANOGPT_KERNELS=/opt/kernels/paged_nanogpt_cpu_kernels.so
# /run/internal-token: where compose mounts the internal token's volume; an empty volume takes
# this directory's owner, so the memory service (uid 10001) can write the token there.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /run/internal-token && chown 10001:10001 /run/internal-token && chmod 700 /run/internal-token
COPY --from=build /opt/venv /opt/venv
# Imported as is (compute_service/native.py, PAGED_NANOGPT_KERNELS): no build, no extension cache.
COPY --from=build /opt/kernels /opt/kernels
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001

EXPOSE 50050 8000 50051 50052 9100 9101 9102
CMD ["python", "-m", "gateway.server"]
