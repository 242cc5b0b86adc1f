"""A run: configuration, per-input checks, executors (in-process, Dask), store, aggregation, gate.

Uses the engine; never imports `verifier.outputs`.
"""
