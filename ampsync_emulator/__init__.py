"""A local, Amplitude-compatible ingestion server for tests, demos and benchmarks.

It stands apart from ampsync: it imports nothing from `tasks` (a unit test enforces it) and
shares no validation or payload code with the client, so a test of one against the other
means something. `ampsync emulator` and `python -m ampsync_emulator` start it.
"""

from .server import Emulator, Faults, main

__all__ = ["Emulator", "Faults", "main"]
