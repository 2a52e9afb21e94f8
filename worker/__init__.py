"""Shared base of the prefill and decode servers: bootstrap, engine flags, registration, drain, load reports, proto conversion."""
