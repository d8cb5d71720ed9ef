"""asv benchmarks for nbxent: see docs/benchmarks.md. Shared helpers are in ``_common``."""
