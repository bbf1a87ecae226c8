"""Unit tier: pure rules, no services (no database, Redis, network or subprocess)."""
