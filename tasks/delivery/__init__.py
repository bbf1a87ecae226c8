"""The delivery path: claim → build payloads → send → read the answer → acknowledge
(docs/architecture.md)."""
