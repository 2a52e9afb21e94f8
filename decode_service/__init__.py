"""tandem decode_service (see docs/architecture.md)."""
