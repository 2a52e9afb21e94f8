"""tandem kvtransfer (see docs/architecture.md)."""
