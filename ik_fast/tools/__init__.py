"""Benchmarks and tools: the benchmark problems and harness, the work counter. Nothing in the library imports
them."""
