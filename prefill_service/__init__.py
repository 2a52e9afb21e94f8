"""tandem prefill_service (see docs/architecture.md)."""
