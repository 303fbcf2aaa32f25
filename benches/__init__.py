"""Benchmarks of gradcore against the memory floor and against peer libraries."""
