"""The `ampsync` command line: commands, the status report, the progress bar and the demo."""

from .main import main

__all__ = ["main"]
