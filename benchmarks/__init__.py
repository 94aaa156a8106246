"""Benchmarks and soak runs: measured, reported, never asserted (the tests live in tests/)."""
