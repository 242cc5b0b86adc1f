"""The verification engine: models and data, regions, bounds, search and exact decision.

Imports nothing from `verifier.run` or `verifier.outputs`.
"""
