# molmo-serve on CUDA: the official vLLM 0.32.0 wheel, our package (the vLLM plugin registers
# itself through the vllm.general_plugins entry point) and the OpenAI-compatible server.
#   docker build -t molmo-serve .
#   docker run --gpus all -p 8000:8000 -v /path/to/checkpoint:/model molmo-serve --model /model
# Without --model the container serves the project's default (demo) model.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first (cached layer), then the source.
COPY pyproject.toml README.md ./
RUN for p in molmo_model molmo_vllm molmo_cli kernels server training clients; do mkdir -p $p && touch $p/__init__.py; done \
 && pip install --upgrade pip && pip install ".[cuda]" && pip uninstall -y molmo-serve
COPY . .
RUN pip install --no-deps -e .

# A non-root user; remote image fetching stays off unless --allow-remote-images is passed.
RUN useradd --create-home molmo && chown -R molmo /app
USER molmo
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status == 200 else 1)"
ENTRYPOINT ["molmo", "serve", "--host", "0.0.0.0", "--port", "8000"]
