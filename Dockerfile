# ampsync: one image for every service of docker-compose.yml (init, worker, beat, flower,
# emulator); the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies are wheels (pymssql bundles FreeTDS, psycopg[binary] bundles libpq): no system
# packages needed.
COPY pyproject.toml README.md beat_schedule.py ./
COPY tasks ./tasks
COPY ampsync_emulator ./ampsync_emulator
RUN pip install . \
    && useradd --create-home --uid 10001 --user-group ampsync

# Celery warns against running as root, and a worker has no business owning the image.
USER ampsync

CMD ["ampsync", "--help"]
