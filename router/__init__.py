"""tandem router (see docs/architecture.md)."""
