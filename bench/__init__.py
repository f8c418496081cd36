"""Benchmark programs (onn-bench) that print one JSON line per measurement."""
