"""Benchmarks that print side-by-side tables (see docs/performance.md)."""
