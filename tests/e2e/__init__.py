"""End-to-end tier: real Celery workers, `ampsync run` / `demo` and other commands as an
operator runs them, Flower and Chromium, against the whole stack."""
