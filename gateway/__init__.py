"""tandem gateway (see docs/architecture.md)."""
