# One image for all three services (memory, compute, gateway): they share the code, the
# tokenizer ranks and the model files; compose picks the command.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# g++ builds the paged-attention C++ kernel once, at image build time.
RUN apt-get update && apt-get install -y --no-install-recommends g++ make \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions
WORKDIR /app

# CPU torch 2.13.0 (never the multi-GB CUDA build): a wheel in ./wheels wins, else PyTorch's CPU index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY wheels/ /wheels/
RUN pip install --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url ${TORCH_INDEX_URL}} torch==2.13.0

# The pinned dependencies, in their own layer: it changes only when pyproject.toml does.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
    && pip install --find-links /wheels -r /tmp/requirements.txt

# The C++ kernels in a layer keyed on their sources alone: a change elsewhere in the tree does not
# recompile them (torch's extension cache under TORCH_EXTENSIONS_DIR finds them at run time).
COPY compute_service/__init__.py compute_service/native.py compute_service/
COPY compute_service/csrc/ compute_service/csrc/
RUN python -m compute_service.native --build --require

COPY . .
RUN protos/generate.sh \
    && useradd --create-home --uid 10001 app && chmod -R a+rX /app \
    && chown -R app /opt/torch_extensions  # torch takes a lock file there when it loads the kernel
USER app

EXPOSE 50050 8000 50051 50052 9100 9101 9102
CMD ["python", "-m", "gateway.server"]
