"""The `tandem` command line: the entry point, the `serve` supervisor, `compose`, the health check. Nothing imports this package."""
