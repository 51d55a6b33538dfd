"""Benchmark evaluation: KnowEdit-compatible metrics and the editing protocols that use them."""
