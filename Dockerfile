# CPU image (default):     docker build -t attamba-serve .
# CUDA image:              docker build -t attamba-serve:cuda --build-arg CUDA=1 \
#                              --build-arg BASE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 .
# Run:                     docker run -p 8000:8000 attamba-serve [--model DIR] [serve / engine flags]
# (the cuda extra compiles kernels, so the CUDA base must be a -devel image.)
# The API key is best passed as -e ATTAMBA_API_KEY=... rather than on the command line.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG CUDA=0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# CUDA bases ship no Python of their own: install one and work in a venv.
RUN if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# torch first, pinned (the CPU wheel unless CUDA=1), so the project layer rebuilds without it.
RUN if [ "$CUDA" = "1" ]; then pip install torch==2.13.0; \
    else pip install torch==2.13.0 --index-url "$TORCH_INDEX"; fi

COPY pyproject.toml README.md ./
COPY models ./models
COPY engine ./engine
COPY kernels ./kernels
COPY server ./server
COPY entrypoints ./entrypoints
COPY benchmarks ./benchmarks
COPY training ./training
RUN if [ "$CUDA" = "1" ]; then pip install ".[cuda]"; else pip install .; fi
COPY checkpoints ./checkpoints

RUN useradd --create-home --uid 1000 attamba
USER attamba

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"

# SIGTERM drains running requests for --grace-period seconds: 8 fits `docker stop`'s default 10 s
# (pass a larger --grace-period together with a larger `docker stop -t`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["attamba", "serve", "--host", "0.0.0.0", "--port", "8000", "--grace-period", "8"]
