"""Celery: the app and its settings, the thin tasks, the worker command line."""
