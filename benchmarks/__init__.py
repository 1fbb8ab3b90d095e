"""Benchmark cases, one module per op (installed as fastdiff.benchmarks); run by fastdiff.benchmark
and by pytest-benchmark (`pytest benchmarks --benchmark-only`)."""
