"""What a feed raises; the CLI and the Celery task catch FeedError and show its message."""

from __future__ import annotations


class FeedError(RuntimeError):
    """A feed cannot run (source unreachable, query failed, a mapped column missing, …).
    The message says which feed and what to change; nothing was enqueued."""


class FeedConfigError(FeedError):
    """The feeds file is wrong; one line per problem, each naming the file, line and key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class FeedConflict(FeedError):
    """Another run of the same feed committed while this one read its source."""
