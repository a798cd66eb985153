"""Tooling for the tests and benchmarks (synthetic runs, a headless browser driver); not part of the package."""
