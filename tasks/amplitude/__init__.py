"""Everything about Amplitude: its limits, payloads built from queue rows, the HTTP client and
what its answers mean (docs/amplitude.md)."""
