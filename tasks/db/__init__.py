"""Every SQL statement ampsync sends, and the tables it owns (docs/architecture.md)."""
