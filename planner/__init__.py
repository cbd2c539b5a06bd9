"""Planner stage of Mammoth Serve: the MammothModa2 autoregressive model on vLLM.

A plain library (an out-of-tree vLLM model plus an async engine wrapper): importable and
testable without Ray.
"""
