"""Integration tier: real databases (PostgreSQL, MariaDB, SQLite) and the emulator, but no
Celery worker and no long-running `ampsync` process."""
