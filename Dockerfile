# One image for every process of the project:
#   worker     python worker.py                                  (the default command)
#   simulator  python -m simulator --host 0.0.0.0 --port 8025
#   CLI        campaigns db migrate   (and any other `campaigns` command)
#
# Settings come from the environment at run time (see campaigns/settings.py); no secret is
# baked into the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Every dependency ships as a wheel for CPython 3.11 on Linux, so no compiler is needed.
# Only what `pip install .` reads is copied (see .dockerignore): tests, benchmarks and the
# local-stack extras (Temporal CLI binary, embedded PostgreSQL) stay out of the image.
COPY pyproject.toml README.md worker.py ./
COPY campaigns ./campaigns
COPY workflows ./workflows
COPY activities ./activities
COPY simulator ./simulator
RUN pip install . \
    && rm -rf build ./*.egg-info

# An unprivileged user; the source stays root-owned, so the process cannot rewrite its code.
# CAMPAIGNS_DATA_DIR points at a directory the user owns, in case a command writes there;
# only that user may read it (it may hold secrets and personal data).
RUN useradd --create-home --uid 10001 --user-group app \
    && install -d -m 0700 -o app -g app /home/app/data
ENV CAMPAIGNS_DATA_DIR=/home/app/data
USER app

# The simulator's port, for documentation; the worker and CLI listen on nothing.
EXPOSE 8025

# Exec form: python is PID 1 and gets SIGTERM itself, so the worker drains in-flight
# activities (graceful shutdown) instead of being killed.
CMD ["python", "worker.py"]
