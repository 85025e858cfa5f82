"""Benchmarks and probes (GPU and CPU measurements, not tests, not user commands): see docs/benchmarks.md."""
