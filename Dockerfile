# ampsync: one image for every service of docker-compose.yml (init, worker, beat, flower,
# emulator); the command picks the role.
# A fixed Python release and Debian base, not a floating tag.
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies are wheels (pymssql bundles FreeTDS, psycopg[binary] bundles libpq): no system
# packages needed.
COPY pyproject.toml README.md LICENSE constraints.txt beat_schedule.py ./
COPY tasks ./tasks
COPY ampsync_emulator ./ampsync_emulator
# deploy/run_flower.py: Flower's start-up check (docker-compose.yml)
COPY deploy ./deploy
# Every driver, so one image serves any database; versions pinned by constraints.txt.
RUN pip install .[postgresql,mysql] -c constraints.txt \
    && useradd --create-home --uid 10001 --user-group ampsync

# Celery warns against running as root, and a worker has no business owning the image.
USER ampsync

CMD ["ampsync", "--help"]
