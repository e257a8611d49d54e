# syntax=docker/dockerfile:1
# The MNIST digit-prediction service. The default command serves the Flask app with gunicorn
# (the Procfile's web line); the same image runs the Celery worker with the Procfile's worker
# line as its command (see docker-compose.yml). Deployed requirements only: no TensorFlow,
# no test or training tools.
#
#   docker build -t mnist-api .
#   docker run --rm -p 8000:8000 -e API_KEY=change-me -e SECRET_KEY=change-me-too mnist-api
FROM python:3.11.7-slim

# PROXY_FIX_X_FOR=0: `docker run -p` puts no proxy in front, so X-Forwarded-For is the
# client's own word and is not trusted for per-IP rate limits (set it behind a proxy).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000 \
    PROXY_FIX_X_FOR=0

WORKDIR /app

# The user the service runs as. The code below stays owned by root, so the service cannot
# change it; it writes only to /tmp (gunicorn's Prometheus multiprocess folder and, without
# Redis, the folder where the workers share async task ids and results).
RUN useradd --no-log-init --create-home --uid 10001 --user-group --shell /usr/sbin/nologin app

# Requirements before code: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# Only what the service runs: the WSGI and Celery entry points, gunicorn's settings, the
# package, the page (templates/, static/) and the int8 models with their cards.
COPY api.py gunicorn.conf.py make_celery.py ./
COPY mnist_api/ ./mnist_api/
COPY templates/ ./templates/
COPY static/ ./static/
COPY models/ ./models/

# Byte-compile the package once, then run the Heroku release check at build time: the build
# fails if the model or its card is missing, if they disagree, or if LiteRT cannot run it.
# instance/ holds the embedded feedback database when DATABASE_URL is unset (mount a volume
# there to keep it); the app user may write only there. The release phase's database steps
# need the runtime's DATABASE_URL, so gunicorn migrates the embedded file when it starts.
RUN python -m compileall -q mnist_api \
    && python -m mnist_api.serving.release_check \
    && install -d -o app -g app instance

# Numeric, so a runtime (Kubernetes runAsNonRoot, say) can tell it is not root: the app user.
USER 10001:10001

EXPOSE 8000

# /healthz answers 200 while the process serves. Python's urllib, as slim has no curl; the
# port is the container's PORT, the one gunicorn.conf.py binds to.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=4)"]

# Exec form, so gunicorn is PID 1 and gets the stop signal; it needs no shell to read PORT:
# gunicorn.conf.py reads PORT (and WEB_CONCURRENCY, GUNICORN_THREADS, ...) itself.
CMD ["gunicorn", "api:app", "-c", "gunicorn.conf.py"]
