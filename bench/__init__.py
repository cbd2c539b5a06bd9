"""Benchmarks (not tests): each module prints JSON on its last line, ratios measured in one run."""
