"""Benchmarks and tools: the benchmark problems and harness, the work counter, the records of measurements.
Nothing in the library imports them."""
